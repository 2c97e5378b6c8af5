"""Which slices of an unfinished step a shard has already applied, per partition.

A worker sends a big step in pieces (protocol/messages.py, `Push.more`), and
the shard applies each piece as it arrives, so a step is no longer applied
all at once. Two things could then apply a slice twice:

- a piece sent again (Lazy Pirate: its reply was lost, or the shard moved);
- a partition taken over mid-step: its first holder died after some
  pieces, and the next holder pushes the whole step again.

The ledger remembers, per (job, member) and the step it is in, the slice
ids applied so far; a slice every member of a push already applied at
that step is skipped. Under BSP that is exact: every holder of a partition
computes the same gradient for the same step (same parameters, batch and
dropout stream: worker/step.py). A slice that some members of a push
applied and others did not (two holders died mid-step and one worker took
both partitions) cannot be split out of the mean it carries: under BSP
that push is refused with the reason; ASP and SSP apply it again, one more
asynchronous update of those slices.

Unclocked pushes (clock -1: tools and benchmarks) have no step to key on;
their pieces are recognised by request id among the last few of the worker.

Pure bookkeeping: no sockets, no arrays.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import SliceData

# Request ids of unclocked pieces remembered per (job, worker): more than a
# client's window of pieces in flight (worker/client.py, PIECE_WINDOW).
RECENT_PIECE_RIDS = 64


class PieceLedger:
    """Slices applied of each member's unfinished step, by job."""

    def __init__(self) -> None:
        self._applied: dict[tuple[str, str], tuple[int, set[int]]] = {}  # (job, member) -> (step, sids)
        self._rids: dict[tuple[str, str], deque] = {}                   # (job, worker) -> recent rids

    def fresh(self, job: str, worker: str, keys: Sequence[str], clock: int, rid: int,
              slices: Sequence[SliceData], *, exact: bool) -> list[SliceData]:
        """The slices of a push (or piece) not applied yet for its members at `clock`.

        `exact` (BSP): a slice applied for some members and not others
        raises BAD_STATE, naming them. Changes nothing; `record` does.
        """
        if clock < 0:
            recent = self._rids.get((job, worker))
            return [] if recent is not None and rid in recent else list(slices)
        done = [self._applied.get((job, key)) for key in keys]
        sets = [entry[1] if entry is not None and entry[0] == clock else None for entry in done]
        if not any(sets):
            return list(slices)
        out = []
        for sl in slices:
            have = [key for key, sids in zip(keys, sets, strict=True) if sids is not None and sl.sid in sids]
            if not have:
                out.append(sl)
            elif len(have) < len(keys):
                if exact:
                    missing = [key for key in keys if key not in have]
                    raise ProtocolError(ErrorCode.BAD_STATE,
                                        f"slice {sl.sid} of step {clock} is already summed for {', '.join(have)} "
                                        f"but not for {', '.join(missing)}: a push of their mean cannot be split; "
                                        "push those partitions' steps one at a time", rid=rid)
                out.append(sl)
        return out

    def record(self, job: str, worker: str, keys: Sequence[str], clock: int, rid: int,
               slices: Sequence[SliceData]) -> None:
        """`slices` of a piece were applied for `keys` at `clock`."""
        if clock < 0:
            recent = self._rids.get((job, worker))
            if recent is None:
                recent = self._rids[(job, worker)] = deque(maxlen=RECENT_PIECE_RIDS)
            recent.append(rid)
            return
        for key in keys:
            entry = self._applied.get((job, key))
            if entry is None or entry[0] != clock:
                entry = self._applied[(job, key)] = (clock, set())
            entry[1].update(sl.sid for sl in slices)

    def finish(self, job: str, keys: Sequence[str]) -> None:
        """The step of `keys` counted (its last piece): forget what its pieces applied."""
        for key in keys:
            self._applied.pop((job, key), None)

    def drop_job(self, job: str) -> None:
        """The job's table was dropped or replaced (restore, reshard)."""
        for key in [k for k in self._applied if k[0] == job]:
            del self._applied[key]
        for key in [k for k in self._rids if k[0] == job]:
            del self._rids[key]
