"""One job's parameter slices on one shard, with their optimizer state.

The table owns the arrays; the optimizer only does math on them
(ps/optim.py); the consistency policy decides when (ps/policy.py).

Zero-copy replies point at these arrays while ZeroMQ's I/O thread may still
be reading them after `send` returns (README.md, "Wire protocol"). Every
reply's trackers are recorded per slice; before a slice is updated, a
still-pending tracker makes the table copy the slice first (copy on write)
and update the copy. The frame in flight keeps the old buffer alive, so it
goes out exactly as it was, and the shard never blocks on a slow peer.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from protocol.messages import SliceData
from protocol.plan import Plan, SliceSpec


class JobTable:
    """Parameter slices of one job held by one shard."""

    def __init__(self, job: str, plan: Plan, shard_id: int, optimizer, policy, *,
                 nonlearned: Iterable[str] = (), initial: Mapping[int, np.ndarray] | None,
                 checkpoint_every: int = 0):
        self.job = job
        self.plan = plan
        self.shard_id = shard_id
        self.optimizer = optimizer
        self.policy = policy
        self.checkpoint_every = checkpoint_every
        self.nonlearned_names = sorted(set(nonlearned))
        self.held: dict[int, SliceSpec] = {s.sid: s for s in plan.slices_on(shard_id)}
        nonlearned_set = set(self.nonlearned_names)
        self.learned = {sid for sid, s in self.held.items() if s.name not in nonlearned_set}
        # Own copies: the initial values arrived as views of a network frame.
        # Without them (a table the scheduler created), zeros until `load`.
        self.values: dict[int, np.ndarray] = {
            sid: (np.zeros(spec.count, dtype=spec.dtype) if initial is None
                  else np.array(initial[sid], dtype=spec.dtype, copy=True).reshape(-1))
            for sid, spec in self.held.items()
        }
        self.loaded = initial is not None   # pushes and pulls wait for the values
        self._unloaded = set() if self.loaded else set(self.held)  # slices no `load` piece brought yet
        self.readers: frozenset = frozenset()  # workers that may read without holding a partition
        self.opt_state: dict[int, dict] = {sid: optimizer.init_state(self.values[sid]) for sid in self.learned}
        self._inflight: dict[int, list] = {}
        self._sums: dict[int, dict[int, np.ndarray]] = {}
        self._spare: dict[int, list[np.ndarray]] = {}
        self.bytes = sum(s.nbytes for s in self.held.values())
        self.pushes = 0
        self.pulls = 0
        self.copies_on_write = 0
        self.last_checkpoint_version = policy.version
        self.staleness: dict[int, int] = {}   # staleness -> pushes applied at it

    def load(self, slices: Iterable[SliceData]) -> bool:
        """Initial values of a table created without them, in one or more pieces (each checked
        by the caller); True once every slice has its value (then pushes and pulls are served)."""
        for sl in slices:
            np.copyto(self.values[sl.sid], sl.data.reshape(-1))
            self._unloaded.discard(sl.sid)
        self.loaded = not self._unloaded
        return self.loaded

    @property
    def version(self) -> int:
        return self.policy.version

    def load_state(self, opt_state: Mapping[int, Mapping[str, np.ndarray]]) -> None:
        """Take the optimizer state of a checkpoint (sid -> key -> array), checked whole before any is used.

        Every learned slice must get exactly the keys its optimizer keeps
        (a slice whose optimizer keeps none may be absent), each with the
        shape it has here; ValueError names the first that does not, and
        then nothing was changed.
        """
        unknown = sorted(set(opt_state) - self.learned)
        if unknown:
            raise ValueError(f"optimizer state for slice {unknown[0]} that this table does not learn")
        for sid in sorted(self.learned):
            have, got = self.opt_state[sid], opt_state.get(sid, {})
            if set(got) != set(have):
                raise ValueError(f"optimizer state of slice {sid} has keys {sorted(got)}; "
                                 f"the optimizer keeps {sorted(have)}")
            for key, arr in got.items():
                if np.shape(arr) != have[key].shape:
                    raise ValueError(f"optimizer state {key!r} of slice {sid} has shape {np.shape(arr)}; "
                                     f"expected {have[key].shape}")
        for sid, state in opt_state.items():
            for key, arr in state.items():
                self.opt_state[sid][key][...] = arr

    # --- reads ---

    def read(self, sids: Iterable[int] | None = None) -> list[SliceData]:
        """The current values of `sids` (all held when None), as views; send them, then `mark_inflight`."""
        chosen = self.held if not sids else sids
        return [SliceData(sid, self.values[sid]) for sid in chosen]

    def mark_inflight(self, slices: list[SliceData], trackers: list | None) -> None:
        """Remember which replies may still be reading which slices.

        `trackers` are the per-frame trackers of the reply: frame 0 is the
        header, frame i+1 carries slices[i]. Trackers already done are dropped.
        """
        if not trackers:
            return
        for sl, tracker in zip(slices, trackers[1:], strict=False):  # frame 0 is the header
            if tracker is not None and not tracker.done:
                self._inflight.setdefault(sl.sid, []).append(tracker)

    def _writable(self, sid: int) -> np.ndarray:
        pending = self._inflight.pop(sid, None)
        if pending and not all(t.done for t in pending):
            # A reply still points at this buffer: update a copy instead.
            self.values[sid] = self.values[sid].copy()
            self.copies_on_write += 1
        return self.values[sid]

    # --- updates ---

    def apply(self, slices: Iterable[SliceData], *, step: int, grad_scale: float = 1.0,
              lr_scale: float = 1.0, count: bool = True) -> None:
        """Apply one push's gradient to its slices at once (ASP, SSP); `count`: False for
        an early piece of a push (the push counts once, at its last piece)."""
        for sl in slices:
            param = self._writable(sl.sid)
            grad = sl.data.reshape(-1)
            if sl.sid in self.learned:
                self.optimizer.step(param, grad, self.opt_state[sl.sid], step=step,
                                    grad_scale=grad_scale, lr_scale=lr_scale)
            else:
                param += grad  # running statistics travel as deltas
        self.pushes += count

    def accumulate(self, step: int, slices: Iterable[SliceData], *, grad_scale: float = 1.0,
                   weight: int = 1, count: bool = True) -> None:
        """Add one push's gradient into step's sum (BSP), times `weight`: a
        push for k partitions carries their mean and counts k times."""
        sums = self._sums.setdefault(step, {})
        for sl in slices:
            grad = sl.data.reshape(-1)
            scale = (grad_scale if sl.sid in self.learned else 1.0) * weight
            if scale != 1.0:
                grad = grad * np.float32(scale)
            buf = sums.get(sl.sid)
            if buf is None:
                spare = self._spare.get(sl.sid)
                buf = spare.pop() if spare else np.empty_like(self.values[sl.sid])
                np.copyto(buf, grad)
                sums[sl.sid] = buf
            else:
                buf += grad
        self.pushes += count

    def apply_mean(self, step: int, count: int) -> None:
        """Apply step's summed gradient divided by `count` as one update (BSP)."""
        sums = self._sums.pop(step, {})
        for sid, buf in sums.items():
            np.divide(buf, np.float32(count), out=buf)
            param = self._writable(sid)
            if sid in self.learned:
                self.optimizer.step(param, buf, self.opt_state[sid], step=step)
            else:
                param += buf
            self._spare.setdefault(sid, []).append(buf)  # reused next step: no page faults

    def record_staleness(self, staleness: int) -> None:
        self.staleness[staleness] = self.staleness.get(staleness, 0) + 1

    def pending_sums(self) -> int:
        return len(self._sums)

    def summary(self) -> dict:
        """What `stats` reports about this table."""
        policy = self.policy
        parked = policy.parked()
        clocks = dict(policy.clocks)
        return {
            "slices": sorted(self.held),
            "names": sorted({s.name for s in self.held.values()}),
            "bytes": self.bytes,
            "version": policy.version,
            "policy": policy.name,
            "staleness_bound": policy.staleness,
            "epoch": policy.epoch,
            "clocks": clocks,
            "min_clock": min(clocks.values()) if clocks else None,
            "max_clock": max(clocks.values()) if clocks else None,
            "parked": len(parked),
            "pushes": self.pushes,
            "pulls": self.pulls,
            "staleness_hist": {str(k): v for k, v in sorted(self.staleness.items())},
            "copies_on_write": self.copies_on_write,
            "plan_digest": self.plan.digest,
        }
