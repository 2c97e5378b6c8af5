"""The partition plan: which shard holds which contiguous piece of which tensor.

A pure function of (names, shapes, dtypes, shard count, partition_bytes),
computed by the scheduler and checked by everyone who receives it: every
tensor is flattened and cut into near-equal contiguous slices of at most
`partition_bytes`; slices are then placed largest first on the least-loaded
shard (greedy LPT), so shard loads differ by at most one slice. A large
layer is spread over every shard; a small one lives whole on one shard.

On the wire a plan travels as its inputs plus a digest of its slices; the
receiver recomputes it and refuses a plan whose digest differs, so two
peers can never disagree on where a byte lives.
"""
from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from protocol.errors import ErrorCode, ProtocolError
from protocol.version import ALLOWED_DTYPES

DEFAULT_PARTITION_BYTES = 4 * 1024 * 1024
# Bounds on what a plan may ask for: a plan arrives off the network, and a
# receiver builds a list per shard and per slice (checked before either).
MAX_SHARDS = 4096
# A plan is rebuilt by every receiver before its digest can be checked, so its
# size is bounded by what a shard may be made to build for one message: 16,384
# slices take ~0.06 s and ~5 MB here (1,000,000 took 5 s and 300 MB). With the
# default 4 MiB partitions that is still a 64 GiB model.
MAX_TENSORS = 16_384
MAX_SLICES = 16_384
MAX_DIMS = 8
MAX_NAME_CHARS = 256
MAX_TENSOR_ELEMENTS = 1 << 40


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor of the model."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class SliceSpec:
    """Elements [start, stop) of the flattened tensor `name`, held by `shard`."""

    sid: int
    name: str
    start: int
    stop: int
    shard: int
    dtype: str

    @property
    def count(self) -> int:
        return self.stop - self.start

    @property
    def nbytes(self) -> int:
        return self.count * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Plan:
    """Where every slice of every tensor lives. Build with `make_plan`."""

    tensors: tuple[TensorSpec, ...]
    slices: tuple[SliceSpec, ...]
    num_shards: int
    partition_bytes: int

    # --- lookups (the tuples are small; these are called per request) ---

    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def slices_of(self, name: str) -> list[SliceSpec]:
        return [s for s in self.slices if s.name == name]

    def slices_on(self, shard: int) -> list[SliceSpec]:
        return [s for s in self.slices if s.shard == shard]

    def shard_bytes(self) -> list[int]:
        loads = [0] * self.num_shards
        for s in self.slices:
            loads[s.shard] += s.nbytes
        return loads

    @property
    def digest(self) -> str:
        """A short hash of every slice; equal plans have equal digests."""
        h = hashlib.sha256()
        for s in self.slices:
            h.update(f"{s.sid}:{s.name}:{s.start}:{s.stop}:{s.shard}:{s.dtype};".encode())
        return h.hexdigest()[:16]

    # --- wire form ---

    def to_wire(self) -> dict:
        return {
            "tensors": [[t.name, list(t.shape), t.dtype] for t in self.tensors],
            "num_shards": self.num_shards,
            "partition_bytes": self.partition_bytes,
            "digest": self.digest,
        }

    @classmethod
    def from_wire(cls, wire: object) -> Plan:
        """Recompute a plan from its wire form; ProtocolError(BAD_PLAN) if it is malformed or its digest differs."""
        if not isinstance(wire, dict):
            raise ProtocolError(ErrorCode.BAD_PLAN, "plan must be a map")
        tensors = wire.get("tensors")
        if not isinstance(tensors, list) or not all(
            isinstance(t, list) and len(t) == 3 and isinstance(t[0], str) and isinstance(t[1], list)
            and isinstance(t[2], str) for t in tensors
        ):
            raise ProtocolError(ErrorCode.BAD_PLAN, "plan.tensors must be a list of [name, shape, dtype]")
        num_shards, partition_bytes = wire.get("num_shards"), wire.get("partition_bytes")
        try:
            plan = make_plan({t[0]: (tuple(t[1]), t[2]) for t in tensors}, num_shards, partition_bytes)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(ErrorCode.BAD_PLAN, f"plan is malformed: {exc}") from None
        if len(tensors) != len(plan.tensors):
            raise ProtocolError(ErrorCode.BAD_PLAN, "plan names a tensor twice")
        if wire.get("digest") != plan.digest:
            raise ProtocolError(
                ErrorCode.BAD_PLAN,
                f"plan digest {wire.get('digest')!r:.40} differs from the recomputed {plan.digest}")
        return plan


def _check_inputs(tensors: Mapping[str, tuple], num_shards: object, partition_bytes: object) -> None:
    """Every bound, before anything is built (a plan off the network must not size an allocation)."""
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or not 1 <= num_shards <= MAX_SHARDS:
        raise ValueError(f"num_shards must be an int in 1..{MAX_SHARDS}, found {num_shards!r:.40}")
    if not isinstance(partition_bytes, int) or isinstance(partition_bytes, bool) or not 1 <= partition_bytes <= 1 << 30:
        raise ValueError(f"partition_bytes must be an int in 1..{1 << 30}, found {partition_bytes!r:.40}")
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"a plan holds at most {MAX_TENSORS} tensors, found {len(tensors)}")
    slices = 0
    for name, (shape, dtype) in tensors.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise ValueError(f"tensor names must be strings of 1..{MAX_NAME_CHARS} characters, found {name!r:.40}")
        if len(shape) > MAX_DIMS or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape):
            raise ValueError(f"tensor {name!r}: shape must be at most {MAX_DIMS} non-negative ints, "
                             f"found {shape!r:.60}")
        if dtype not in ALLOWED_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype!r} is not allowed")
        itemsize = np.dtype(dtype).itemsize
        if itemsize > partition_bytes:
            raise ValueError(f"partition_bytes {partition_bytes} is smaller than one {dtype} element")
        size = math.prod(shape)
        if size > MAX_TENSOR_ELEMENTS:
            raise ValueError(f"tensor {name!r} has {size} elements, over {MAX_TENSOR_ELEMENTS}")
        slices += max(1, -(-size // (partition_bytes // itemsize)))
        if slices > MAX_SLICES:
            raise ValueError(f"the plan would cut over {MAX_SLICES} slices: raise partition_bytes")


def _cut(size: int, max_count: int) -> list[tuple[int, int]]:
    """Near-equal contiguous pieces [start, stop) of range(size), each <= max_count."""
    if size == 0:
        return [(0, 0)]  # an empty tensor still has one (empty) slice, so it can be pulled
    pieces = -(-size // max_count)
    base, extra = divmod(size, pieces)
    out, start = [], 0
    for i in range(pieces):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def make_plan(
    tensors: Mapping[str, tuple[Sequence[int], str]],
    num_shards: int,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
) -> Plan:
    """The plan for `tensors` (name -> (shape, dtype)) over `num_shards` shards.

    Pure and deterministic: the order of `tensors` does not matter (names are
    sorted). Raises ValueError on bad inputs.
    """
    tensors = {name: (tuple(shape), str(dtype)) for name, (shape, dtype) in tensors.items()}
    _check_inputs(tensors, num_shards, partition_bytes)
    specs = tuple(TensorSpec(name, shape, dtype) for name, (shape, dtype) in sorted(tensors.items()))
    pieces = []  # (name, start, stop, dtype) in sid order
    for t in specs:
        for start, stop in _cut(t.size, partition_bytes // t.itemsize):
            pieces.append((t.name, start, stop, t.dtype))
    # Largest slice first onto the least-loaded shard; ties by sid and shard
    # id, so the result is a pure function of the inputs.
    order = sorted(range(len(pieces)),
                   key=lambda i: (-(pieces[i][2] - pieces[i][1]) * np.dtype(pieces[i][3]).itemsize, i))
    heap = [(0, k) for k in range(num_shards)]
    shard_of = [0] * len(pieces)
    for i in order:
        load, k = heapq.heappop(heap)
        name, start, stop, dtype = pieces[i]
        shard_of[i] = k
        heapq.heappush(heap, (load + (stop - start) * np.dtype(dtype).itemsize, k))
    slices = tuple(
        SliceSpec(sid, name, start, stop, shard_of[sid], dtype)
        for sid, (name, start, stop, dtype) in enumerate(pieces)
    )
    return Plan(specs, slices, num_shards, partition_bytes)
