"""A job's checkpoint on S shards cut onto S' shards (ps/reshard.py), with real files: every element
of every tensor, and of Adam's moments, lands where the new plan puts it; the step count and the
clocks come along; a damaged old file is refused with its name and reason."""
from __future__ import annotations

import numpy as np
import pytest

from protocol.plan import make_plan
from ps import checkpoint
from ps.checkpoint import BadCheckpoint
from ps.optim import make_optimizer
from ps.policy import make_policy
from ps.reshard import resharded_table
from ps.table import JobTable

TENSORS = {"dense0.W": ((64, 48), "float32"), "dense0.b": ((48,), "float32"),
           "dense1.W": ((48, 10), "float32"), "dense1.b": ((10,), "float32")}
SLICE_BYTES = 4096   # small slices, so that slices split differently on 2, 3 and 5 shards
VERSION = 40


def whole(rng) -> dict[str, np.ndarray]:
    return {name: rng.standard_normal(shape).astype(dtype).reshape(-1) for name, (shape, dtype) in TENSORS.items()}


def write_old(root, num_shards: int, values, moments, *, job="j") -> None:
    """The checkpoint of version VERSION of each of `num_shards` shards, cut from the whole tensors."""
    plan = make_plan(TENSORS, num_shards, SLICE_BYTES)
    for k in range(num_shards):
        policy = make_policy({"policy": "bsp"})
        policy.version = VERSION
        policy.clocks = {"p0": VERSION, "p1": VERSION + (1 if k == 0 else 0)}
        mine = plan.slices_on(k)
        table = JobTable(job, plan, k, make_optimizer({"kind": "adam", "lr": 0.01}), policy,
                         initial={s.sid: values[s.name][s.start:s.stop] for s in mine}, checkpoint_every=20)
        table.load_state({s.sid: {"m": moments[s.name][s.start:s.stop], "v": moments[s.name][s.start:s.stop] ** 2,
                                  "t": np.array(VERSION, np.int64)} for s in mine})
        checkpoint.save(root, table)
    return plan


def gather(tables, plan) -> tuple[dict, dict, dict]:
    values = {n: np.full(int(np.prod(shape)), np.nan, np.float32) for n, (shape, _d) in TENSORS.items()}
    m = {n: a.copy() for n, a in values.items()}
    t = {}
    for k, table in enumerate(tables):
        for s in plan.slices_on(k):
            values[s.name][s.start:s.stop] = table.values[s.sid]
            m[s.name][s.start:s.stop] = table.opt_state[s.sid]["m"]
            t[s.sid] = int(table.opt_state[s.sid]["t"])
    return values, m, t


@pytest.mark.parametrize("old_count,new_count", [(2, 3), (3, 2), (2, 5), (1, 2)])
def test_every_element_and_moment_lands_where_the_new_plan_puts_it(tmp_path, old_count, new_count):
    rng = np.random.default_rng(7)
    values, moments = whole(rng), whole(rng)
    old = write_old(tmp_path, old_count, values, moments)
    new = make_plan(TENSORS, new_count, SLICE_BYTES)
    tables = [resharded_table(str(tmp_path), "j", VERSION, old, new, k) for k in range(new_count)]
    got, got_m, steps = gather(tables, new)
    for name in TENSORS:
        np.testing.assert_array_equal(got[name], values[name], err_msg=name)
        np.testing.assert_array_equal(got_m[name], moments[name], err_msg=name)
    assert set(steps.values()) == {VERSION}
    for table in tables:
        assert table.version == VERSION and table.loaded
        # each partition's least clock over every old shard (only shard 0 is one step ahead on p1)
        assert table.policy.clocks == {"p0": VERSION, "p1": VERSION + (old_count == 1)}
        assert table.plan.digest == new.digest


def test_a_damaged_old_file_is_refused_with_its_name(tmp_path):
    rng = np.random.default_rng(1)
    old = write_old(tmp_path, 2, whole(rng), whole(rng))
    path = checkpoint.path_of(checkpoint.job_dir(tmp_path, "j", 1), VERSION)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    new = make_plan(TENSORS, 3, SLICE_BYTES)
    with pytest.raises(BadCheckpoint, match="old shard 1's ckpt-000000000040.npz"):
        for k in range(3):
            resharded_table(str(tmp_path), "j", VERSION, old, new, k)


def test_a_missing_old_file_and_another_model_are_refused(tmp_path):
    rng = np.random.default_rng(2)
    old = write_old(tmp_path, 2, whole(rng), whole(rng))
    new = make_plan(TENSORS, 3, SLICE_BYTES)
    with pytest.raises(BadCheckpoint, match="unreadable"):
        resharded_table(str(tmp_path), "j", VERSION + 20, old, new, 0)
    other = make_plan({**TENSORS, "dense1.b": ((11,), "float32")}, 3, SLICE_BYTES)
    with pytest.raises(BadCheckpoint, match="other tensors"):
        resharded_table(str(tmp_path), "j", VERSION, old, other, 0)
