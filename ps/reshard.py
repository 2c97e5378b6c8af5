"""A job's table on another shard count, cut out of the checkpoint its old shards wrote.

A job checkpointed on S shards goes on on S' (README.md, "Checkpoints of a
job, and rollback"): every new shard reads, from the checkpoint root all
shards share (`--checkpoint-dir` on one volume, `shard-K/JOB/` per old
shard K), the files of version v of the old shards (those whose slices overlap its
new ones kept, the others only checked), as any restore checks them
(ps/checkpoint.py), and copies
each overlapping range of elements into its new slices: the values, and
the optimizer state the same way where it is one number per element
(momentum's velocity, Adam's moments); a per-slice scalar (Adam's step
count) is the same on every old slice of a version and is copied from the
first. The clock table is the least clock of each partition over the old
shards, the version v. Plain file work, no sockets: the shard runs it.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from protocol.plan import Plan, SliceSpec
from ps import checkpoint
from ps.checkpoint import BadCheckpoint, Loaded
from ps.optim import make_optimizer
from ps.policy import Policy
from ps.table import JobTable


def _overlaps(new: SliceSpec, old_plan: Plan) -> list[SliceSpec]:
    return [o for o in old_plan.slices if o.name == new.name and o.start < new.stop and new.start < o.stop]


def load_old(root: str, job: str, version: int, old_plan: Plan, new_plan: Plan, shard_id: int) -> dict[int, Loaded]:
    """The checked checkpoints of `version` of every old shard: with their arrays for those this shard's
    new slices need, checked without keeping them for the others (their clock tables count too)."""
    need = {o.shard for s in new_plan.slices_on(shard_id) for o in _overlaps(s, old_plan)}
    loaded = {}
    for k in range(old_plan.num_shards):
        path = checkpoint.path_of(checkpoint.job_dir(root, job, k), version)
        try:
            loaded[k] = checkpoint.load(path, job=job, shard_id=k, plan=old_plan, keep=k in need)
        except BadCheckpoint as exc:
            raise BadCheckpoint(f"old shard {k}'s {path.name}: {exc.reason}") from None
    return loaded


def _cut(new: SliceSpec, old_plan: Plan, arrays: Mapping[int, Mapping[int, np.ndarray]], dtype) -> np.ndarray:
    out = np.empty(new.count, dtype=dtype)
    for o in _overlaps(new, old_plan):
        lo, hi = max(new.start, o.start), min(new.stop, o.stop)
        out[lo - new.start:hi - new.start] = arrays[o.shard][o.sid][lo - o.start:hi - o.start]
    return out


def _merged_policy(loaded: Mapping[int, Loaded], version: int) -> Policy:
    """The old shards' policy state with each member's least clock (every old shard's version is `version`)."""
    states = [item.meta["policy"] for item in loaded.values()]
    clocks: dict[str, int] = {}
    for state in states:
        for member, clock in state.get("clocks", {}).items():
            clocks[member] = min(int(clock), clocks.get(member, int(clock)))
    merged = dict(states[0], clocks=clocks, version=version, holders={})
    return Policy.from_state(merged)


def resharded_table(root: str, job: str, version: int, old_plan: Plan, new_plan: Plan, shard_id: int) -> JobTable:
    """This shard's table of `job` under `new_plan`, from version `version` of the old shards' checkpoints.

    BadCheckpoint names the file and the check that failed, or a slice no old shard covers.
    """
    if {t.name: (t.shape, t.dtype) for t in old_plan.tensors} != {t.name: (t.shape, t.dtype) for t in new_plan.tensors}:
        raise BadCheckpoint("the new plan has other tensors than the old one")
    loaded = load_old(root, job, version, old_plan, new_plan, shard_id)
    mine = new_plan.slices_on(shard_id)
    for s in mine:
        covered = sum(min(s.stop, o.stop) - max(s.start, o.start) for o in _overlaps(s, old_plan))
        if covered != s.count:
            raise BadCheckpoint(f"slice {s.sid} ({s.name}[{s.start}:{s.stop}]) is not covered by the old plan")
    loaded_meta, policy = loaded[0].meta, _merged_policy(loaded, version)
    values = {k: item.values for k, item in loaded.items()}
    initial = {s.sid: _cut(s, old_plan, values, np.dtype(s.dtype)) for s in mine}
    optimizer = make_optimizer(loaded_meta["optimizer"])
    table = JobTable(job, new_plan, shard_id, optimizer, policy, nonlearned=loaded_meta["nonlearned"],
                     initial=initial, checkpoint_every=loaded_meta["checkpoint_every"])
    state: dict[int, dict[str, np.ndarray]] = {}
    for s in mine:
        if s.sid not in table.learned:
            continue
        fresh = table.opt_state[s.sid]
        olds = _overlaps(s, old_plan)
        state[s.sid] = {}
        for key, arr in fresh.items():
            per_element = {k: {o.sid: loaded[k].state[o.sid][key].reshape(-1) for o in olds if o.shard == k}
                           for k in {o.shard for o in olds}}
            if arr.shape == (s.count,):
                state[s.sid][key] = _cut(s, old_plan, per_element, arr.dtype)
            else:
                first = olds[0]
                state[s.sid][key] = loaded[first.shard].state[first.sid][key].reshape(arr.shape)
    table.load_state(state)
    return table
