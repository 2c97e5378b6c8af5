"""Checks of a decoded message against a job's plan (what `decode` cannot know).

A shard calls these before it touches a parameter: every slice id must be
one the plan puts on this shard, and every array must have the plan's dtype
and element count. They raise ProtocolError with the code to send back.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np

from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import SliceData
from protocol.plan import SliceSpec


def check_sids(sids: Iterable[int], held: Mapping[int, SliceSpec], *, rid: int = 0, job: str = "") -> None:
    """Every id in `sids` names a slice in `held` (this shard's slices of the job)."""
    for sid in sids:
        if sid not in held:
            raise ProtocolError(ErrorCode.UNKNOWN_SLICE,
                                f"slice {sid} is not held by this shard for job {job!r}", rid=rid)


_DTYPES: dict[str, np.dtype] = {}


def _dtype(name: str) -> np.dtype:
    """np.dtype(name), cached: comparing dtype objects is cheap, `dtype.name` is not."""
    dt = _DTYPES.get(name)
    if dt is None:
        dt = _DTYPES[name] = np.dtype(name)
    return dt


def check_payload(slices: Iterable[SliceData], held: Mapping[int, SliceSpec], *,
                  rid: int = 0, job: str = "", complete: bool = False) -> None:
    """Each array matches its slice's dtype and element count.

    With `complete`, the message must also carry every slice in `held`
    exactly once (a table's initial values).
    """
    seen = set()
    for sl in slices:
        spec = held.get(sl.sid)
        if spec is None:
            raise ProtocolError(ErrorCode.UNKNOWN_SLICE,
                                f"slice {sl.sid} is not held by this shard for job {job!r}", rid=rid)
        if sl.data.dtype != _dtype(spec.dtype):
            raise ProtocolError(ErrorCode.BAD_DTYPE,
                                f"slice {sl.sid} ({spec.name}) is {spec.dtype}, found {sl.data.dtype.name}", rid=rid)
        if sl.data.size != spec.count:
            raise ProtocolError(ErrorCode.BAD_LENGTH,
                                f"slice {sl.sid} ({spec.name}) has {spec.count} elements, found {sl.data.size}",
                                rid=rid)
        seen.add(sl.sid)
    if complete and len(seen) != len(held):
        missing = sorted(set(held) - seen)
        raise ProtocolError(ErrorCode.TRUNCATED,
                            f"{len(missing)} slices of this shard are missing (first: {missing[0]})", rid=rid)


# Job ids name directories on disk (checkpoints): letters, digits, '.', '_'
# and '-' only, starting alphanumeric, so an id can never climb out of one.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_job_id(job: str, *, rid: int = 0) -> None:
    """`job` is a well-formed job id (raises BAD_FIELD otherwise)."""
    if not JOB_ID_RE.fullmatch(job):
        raise ProtocolError(ErrorCode.BAD_FIELD,
                            f"job id {job!r:.60} must be 1-128 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit", rid=rid)
