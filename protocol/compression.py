"""Gradients on the wire: the job's `compression` (none | fp16 | topk:RATIO). Pure numpy, no sockets.

- fp16: each gradient slice travels as float16 (half the bytes); the shard
  widens it to float32 as it arrives, so sums and optimizer state stay
  float32. Parameters come back as float32.
- topk:RATIO: each slice sends only its ceil(RATIO x count) largest entries
  by magnitude, as two frames with the same slice id: int32 positions, then
  float32 values (`Push.coding` = "topk"). What is not sent is not lost: the
  worker keeps it (error feedback) and adds it to the same slice's gradient
  at the next step, so every gradient entry reaches the shard eventually.
  The residual costs the worker one float32 copy of the gradient.

The worker side is `Compressor`; the shard side is `wire_slices`, which
checks a push's payload against the plan and returns dense float32 slices.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import SliceData
from protocol.plan import SliceSpec
from protocol.validate import check_payload

NONE, FP16, TOPK = "none", "fp16", "topk"
_F16, _F32, _I32 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.int32)


def parse(compression: str | None) -> tuple[str, float]:
    """'topk:0.01' -> ('topk', 0.01); 'fp16' -> ('fp16', 1.0); None or 'none' -> ('none', 1.0)."""
    if not compression or compression == NONE:
        return NONE, 1.0
    if compression == FP16:
        return FP16, 1.0
    kind, _, ratio = compression.partition(":")
    if kind != TOPK:
        raise ValueError(f"compression: expected none, fp16 or topk:RATIO, found {compression!r}")
    value = float(ratio)
    if not 0 < value <= 0.5:
        raise ValueError(f"compression: topk ratio must be in (0, 0.5], found {ratio!r}")
    return TOPK, value


class Compressor:
    """A worker's encoder of gradient slices, with the top-k residual of each slice it sent."""

    def __init__(self, compression: str | None):
        self.kind, self.ratio = parse(compression)
        self.residual: dict[int, np.ndarray] = {}   # sid -> what top-k has not sent yet

    @property
    def coding(self) -> str:
        """What a push's `coding` field says: "topk", or "" (dense: float32 or float16)."""
        return TOPK if self.kind == TOPK else ""

    def encode(self, sl: SliceData) -> tuple[SliceData, ...]:
        """The frames that carry one float32 gradient slice (a pair for top-k)."""
        if self.kind == NONE:
            return (sl,)
        if self.kind == FP16:
            return (SliceData(sl.sid, sl.data.astype(np.float16)),)
        r = self.residual.get(sl.sid)
        if r is None:
            r = self.residual[sl.sid] = np.zeros(sl.data.size, np.float32)
        r += sl.data.reshape(-1)
        k = max(1, math.ceil(self.ratio * r.size))
        idx = np.argpartition(np.abs(r), r.size - k)[r.size - k:].astype(np.int32) if k < r.size \
            else np.arange(r.size, dtype=np.int32)
        idx.sort()  # sequential writes on the shard
        values = r[idx]                    # a copy
        r[idx] = 0.0
        return SliceData(sl.sid, idx), SliceData(sl.sid, values)


def wire_slices(slices: tuple, held: Mapping[int, SliceSpec], coding: str, *, rid: int = 0,
                job: str = "") -> list[SliceData]:
    """A push's payload as dense float32 gradient slices, checked first (ProtocolError otherwise).

    Dense pushes may carry float16 for float32 slices; "topk" pushes carry
    (positions, values) pairs per slice: int32 positions, strictly increasing
    and inside the slice, and as many float32 or float16 values.
    """
    if coding == "":
        if not any(sl.data.dtype == _F16 for sl in slices):
            check_payload(slices, held, rid=rid, job=job)
            return list(slices)
        wide = [SliceData(sl.sid, sl.data.astype(np.float32))
                if sl.data.dtype == _F16 and held.get(sl.sid) is not None and held[sl.sid].dtype == "float32"
                else sl for sl in slices]
        check_payload(wide, held, rid=rid, job=job)
        return wide
    if coding != TOPK:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"coding must be '' or 'topk', found {coding!r:.40}", rid=rid)
    if len(slices) % 2:
        raise ProtocolError(ErrorCode.BAD_LENGTH, "a topk push carries (positions, values) pairs of frames", rid=rid)
    out = []
    for pos, val in zip(slices[::2], slices[1::2], strict=True):
        spec = held.get(pos.sid)
        if spec is None or val.sid != pos.sid:
            raise ProtocolError(ErrorCode.UNKNOWN_SLICE, f"topk pair for slice {pos.sid}/{val.sid} is not a "
                                f"slice this shard holds for job {job!r}", rid=rid)
        if pos.data.dtype != _I32 or val.data.dtype not in (_F32, _F16) or spec.dtype != "float32":
            raise ProtocolError(ErrorCode.BAD_DTYPE, f"slice {pos.sid}: topk needs int32 positions and float32 or "
                                "float16 values of a float32 slice", rid=rid)
        idx = pos.data
        if idx.size != val.data.size or idx.size > spec.count or (idx.size and (
                idx[0] < 0 or idx[-1] >= spec.count or (idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1]))))):
            raise ProtocolError(ErrorCode.BAD_LENGTH, f"slice {pos.sid}: topk positions must be increasing, "
                                f"inside 0..{spec.count - 1}, one per value", rid=rid)
        dense = np.zeros(spec.count, np.float32)
        dense[idx] = val.data
        out.append(SliceData(pos.sid, dense))
    return out
