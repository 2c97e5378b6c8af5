"""Frames <-> messages. Pure functions: no sockets, no threads.

`encode(msg)` returns the frames to send: the msgpack header first, then one
buffer per payload array that points at the array's own memory (no copy;
the caller sends them with `copy=False` and must not modify the arrays
until the send is done).

`decode(frames)` checks everything before anything is used (README.md,
"Wire protocol"): size, header encoding, version, op, the type of every
header field, clock range, payload dtypes against an allow-list, the
number of payload frames, and each frame's length against count x itemsize.
It raises `ProtocolError` with a code a daemon can send back. Payload
arrays are read-only views of the received frames (`np.frombuffer`).

Checks that need a job's plan (slice ids that exist, dtypes and counts the
plan gives) are in `protocol.validate`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack
import numpy as np

from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import KINDS, Error, Message, Ok, SliceData
from protocol.version import (
    ALLOWED_DTYPES,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CLOCK,
    MAX_HEADER_BYTES,
    MAX_HEADER_ITEMS,
    MAX_RID,
    PROTOCOL_VERSION,
)

# Python type each annotation names; bool is checked apart since it is an int.
_SCALAR_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "list": list}
_BASE_FIELDS = ("rid", "job", "worker", "clock")
_ALLOWED = frozenset(ALLOWED_DTYPES)
# Longest id (job, worker) we accept: ids are names, not payloads.
MAX_ID_CHARS = 256


def _field_table(cls: type[Message]) -> list[tuple[str, str, dict]]:
    return [
        (f.name, f.type if isinstance(f.type, str) else f.type.__name__, dict(f.metadata))
        for f in dataclasses.fields(cls)
        if f.name != "slices"
    ]


_FIELDS = {op: _field_table(cls) for op, cls in KINDS.items()}


# --- encode -----------------------------------------------------------------

# Header field names per op, in the order the dataclass declares them.
_NAMES = {op: tuple(name for name, _t, _m in fields) for op, fields in _FIELDS.items()}
# Allowed dtypes by dtype object: a dict lookup instead of `dtype.name`,
# which numpy computes in Python on every access (microseconds per slice).
# Only native byte order is listed; other arrays take the slow path.
_NAME_OF_DTYPE = {np.dtype(name): name for name in ALLOWED_DTYPES}


def _payload_buffer(arr: np.ndarray) -> np.ndarray:
    """A flat uint8 view of `arr`'s bytes; copies only if `arr` is not C-contiguous."""
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr.reshape(-1).view(np.uint8)


def _travelling(arr: np.ndarray) -> tuple[str, np.ndarray]:
    """(dtype name, array in native byte order) for an array whose dtype is not a plain allowed one."""
    name = arr.dtype.name
    if name not in _ALLOWED:
        raise ValueError(f"dtype {name} cannot travel; allowed: {', '.join(ALLOWED_DTYPES)}")
    return name, arr.astype(arr.dtype.newbyteorder("="))  # frames carry native (little-endian) bytes


def encode(msg: Message) -> list:
    """Frames for `msg`: [header bytes, payload buffer, ...].

    Payload buffers are views of the message's arrays (no copy when they are
    C-contiguous). Raises ValueError for a payload dtype outside the allow-list.
    """
    op = msg.OP
    values = msg.__dict__  # frozen dataclass: every field is in __dict__
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": op}
    for name in _NAMES[op]:
        header[name] = values[name]
    frames: list = [b""]
    if msg.HAS_PAYLOAD:
        metas = []
        for sl in msg.slices:
            arr = sl.data
            if type(arr) is not np.ndarray:
                arr = np.asarray(arr)
            name = _NAME_OF_DTYPE.get(arr.dtype)
            if name is None:
                name, arr = _travelling(arr)
            metas.append([int(sl.sid), name, arr.size, list(arr.shape)])
            frames.append(_payload_buffer(arr))
        header["s"] = metas
    frames[0] = msgpack.packb(header, use_bin_type=True)
    return frames


def error_frames(rid: int, code: ErrorCode, message: str, *, job: str = "", detail: dict | None = None) -> list:
    """Frames of an `error` reply; the one place replies to bad input are made."""
    return encode(Error(rid=rid, job=job, code=ErrorCode(code).value, message=message, detail=detail or {}))


# --- decode -----------------------------------------------------------------

def _nbytes(frame: Any) -> int:
    return memoryview(frame).nbytes


def _bad(code: ErrorCode, message: str, rid: int = 0) -> ProtocolError:
    return ProtocolError(code, message, rid=rid)


def _check_value(op: str, name: str, tname: str, meta: dict, value: Any, rid: int) -> Any:
    want = _SCALAR_TYPES[tname]
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise _bad(ErrorCode.BAD_FIELD,
                   f"field '{name}' of '{op}' must be {tname}, found {type(value).__name__}", rid)
    if want is float and not math.isfinite(value):
        raise _bad(ErrorCode.BAD_FIELD, f"field '{name}' of '{op}' must be finite, found {value}", rid)
    item_type = meta.get("items")
    if item_type is not None:
        for item in value:
            if not isinstance(item, item_type) or isinstance(item, bool):
                raise _bad(ErrorCode.BAD_FIELD,
                           f"field '{name}' of '{op}' must hold {item_type.__name__} items, "
                           f"found {type(item).__name__}", rid)
    value_type = meta.get("values")
    if value_type is not None:
        for key, item in value.items():
            if not isinstance(key, str) or not isinstance(item, value_type) or isinstance(item, bool):
                raise _bad(ErrorCode.BAD_FIELD,
                           f"field '{name}' of '{op}' must map str to {value_type.__name__}", rid)
    return value


# Per op: (name, exact Python type, needs the full check) for every header
# field. A value whose type is exactly the declared one and that has no
# items, values or finiteness to check is taken as is; anything else goes
# through `_check_value`, which also produces the error sentence.
_FAST_FIELDS = {
    op: tuple((name, _SCALAR_TYPES[tname], tname == "float" or bool(meta), tname, meta)
              for name, tname, meta in fields)
    for op, fields in _FIELDS.items()
}
_KNOWN_KEYS = {op: frozenset({"v", "op", "s"} | {name for name, _t, _m in fields}) for op, fields in _FIELDS.items()}
_UNPACK_LIMITS = {
    "raw": False, "strict_map_key": True, "use_list": True,
    "max_str_len": MAX_HEADER_BYTES, "max_bin_len": 0,
    "max_array_len": MAX_HEADER_ITEMS, "max_map_len": MAX_HEADER_ITEMS, "max_ext_len": 0,
}
_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}


def _builder(cls: type[Message]):
    """A fast constructor for `cls` from already-checked field values.

    A frozen dataclass's __init__ sets each field through object.__setattr__;
    filling the instance's __dict__ with the defaults and then the decoded
    values builds the same object in a fraction of the time. Kinds that
    define __post_init__ keep their real __init__.
    """
    if hasattr(cls, "__post_init__"):
        return lambda kwargs: cls(**kwargs)
    fixed = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    factories = {f.name: f.default_factory for f in dataclasses.fields(cls)
                 if f.default_factory is not dataclasses.MISSING}
    new = object.__new__

    def build(kwargs: dict) -> Message:
        obj = new(cls)
        values = obj.__dict__
        values.update(fixed)
        for name, factory in factories.items():
            if name not in kwargs:
                values[name] = factory()
        values.update(kwargs)
        return obj

    return build


_BUILD = {op: _builder(cls) for op, cls in KINDS.items()}


def _unpack_header(frame: Any) -> dict:
    if _nbytes(frame) > MAX_HEADER_BYTES:
        raise _bad(ErrorCode.TOO_LARGE, f"header of {_nbytes(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(frame, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise _bad(ErrorCode.BAD_FRAME, f"header is not a msgpack map ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise _bad(ErrorCode.BAD_FRAME, f"header must be a map, found {type(header).__name__}")
    return header


def _decode_base(header: dict) -> tuple[int, str]:
    rid = header.get("rid", 0)
    # rid first, so every later error can be matched to its request.
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid <= MAX_RID:
        raise _bad(ErrorCode.BAD_FIELD, f"field 'rid' must be an int in [0, {MAX_RID}], found {rid!r:.40}")
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise _bad(ErrorCode.BAD_VERSION,
                   f"protocol version {version!r:.20} is not spoken here (this side speaks {PROTOCOL_VERSION})", rid)
    op = header.get("op")
    if not isinstance(op, str) or op not in KINDS:
        raise _bad(ErrorCode.UNKNOWN_OP, f"unknown op {op!r:.40}; known: {', '.join(sorted(KINDS))}", rid)
    return rid, op


def _is_count(value: Any) -> bool:
    """A non-negative int that is not a bool."""
    return type(value) is int and value >= 0


def _decode_slices(op: str, header: dict, payload: Sequence[Any], sizes: Sequence[int], rid: int) -> tuple:
    metas = header.get("s", [])
    if not isinstance(metas, list):
        raise _bad(ErrorCode.BAD_FIELD, f"field 's' of '{op}' must be a list, found {type(metas).__name__}", rid)
    if len(metas) != len(payload):
        raise _bad(ErrorCode.TRUNCATED,
                   f"header lists {len(metas)} payload frames but {len(payload)} arrived", rid)
    seen: set[int] = set()
    pairs = header.get("coding") == "topk"
    out = []
    for i, meta in enumerate(metas):
        if not (isinstance(meta, list) and len(meta) == 4):
            raise _bad(ErrorCode.BAD_FIELD, f"slice meta {i} must be [sid, dtype, count, shape]", rid)
        sid, dtype, count, shape = meta
        if not _is_count(sid):
            raise _bad(ErrorCode.BAD_FIELD,
                       f"slice meta {i}: slice id must be a non-negative int, found {sid!r:.40}", rid)
        # A top-k push carries each slice as two frames in a row (protocol/compression.py).
        if sid in seen and not (pairs and i % 2 and metas[i - 1][0] == sid):
            raise _bad(ErrorCode.BAD_FIELD, f"slice {sid} appears twice in one message", rid)
        seen.add(sid)
        np_dtype = _DTYPES.get(dtype) if isinstance(dtype, str) else None
        if np_dtype is None:
            raise _bad(ErrorCode.BAD_DTYPE,
                       f"slice {sid}: dtype {dtype!r:.40} is not allowed (allowed: {', '.join(ALLOWED_DTYPES)})", rid)
        if not _is_count(count):
            raise _bad(ErrorCode.BAD_FIELD, f"slice {sid}: count must be a non-negative int, found {count!r:.40}", rid)
        if not isinstance(shape, list) or len(shape) > 32 or not all(_is_count(d) for d in shape):
            raise _bad(ErrorCode.BAD_FIELD, f"slice {sid}: shape must be a list of non-negative ints", rid)
        if (shape[0] if len(shape) == 1 else math.prod(shape)) != count:
            raise _bad(ErrorCode.BAD_FIELD, f"slice {sid}: shape {shape} does not hold {count} elements", rid)
        itemsize = np_dtype.itemsize
        size = sizes[i]
        if size != count * itemsize:
            raise _bad(ErrorCode.BAD_LENGTH,
                       f"slice {sid}: frame has {size} bytes, expected {count} x {itemsize} = {count * itemsize}", rid)
        if count == 0:
            arr = np.empty(shape, dtype=np_dtype)
        else:
            arr = np.frombuffer(payload[i], dtype=np_dtype, count=count)
            if len(shape) != 1:
                arr = arr.reshape(shape)
        out.append(SliceData(sid, arr))
    return tuple(out)


def decode(frames: Sequence[Any], *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """The message in `frames` (header frame first, no routing identity).

    Frames may be bytes, memoryviews or zmq.Frame objects (anything with the
    buffer protocol). Raises ProtocolError; its `rid` is the request id when
    the header got far enough to carry one, so the error reply can name it.
    """
    if not frames:
        raise _bad(ErrorCode.BAD_FRAME, "empty message: no header frame")
    try:
        sizes = [memoryview(f).nbytes for f in frames]
    except TypeError:
        raise _bad(ErrorCode.BAD_FRAME, "a frame is not a byte buffer") from None
    header = _unpack_header(frames[0])
    rid, op = _decode_base(header)
    if sum(sizes) > max_message_bytes:
        raise _bad(ErrorCode.TOO_LARGE, f"message of {sum(sizes)} bytes exceeds the limit of {max_message_bytes}", rid)
    cls = KINDS[op]
    if not _KNOWN_KEYS[op].issuperset(header):
        extra = sorted(k for k in header if k not in _KNOWN_KEYS[op])
        raise _bad(ErrorCode.BAD_FIELD, f"'{op}' has no field {extra[0]!r:.40}", rid)
    kwargs: dict[str, Any] = {}
    for name, want, full, tname, meta in _FAST_FIELDS[op]:
        if name in header:
            value = header[name]
            if full or type(value) is not want:
                value = _check_value(op, name, tname, meta, value, rid)
            kwargs[name] = value
    for name in ("job", "worker"):
        if len(kwargs.get(name, "")) > MAX_ID_CHARS:
            raise _bad(ErrorCode.BAD_FIELD, f"field '{name}' is longer than {MAX_ID_CHARS} characters", rid)
    clock = kwargs.get("clock", -1)
    if not -1 <= clock <= MAX_CLOCK:
        raise _bad(ErrorCode.BAD_CLOCK, f"clock {clock} is outside [-1, {MAX_CLOCK}]", rid)
    payload = frames[1:]
    if cls.HAS_PAYLOAD:
        kwargs["slices"] = _decode_slices(op, header, payload, sizes[1:], rid)
    elif payload or "s" in header:
        raise _bad(ErrorCode.TRUNCATED, f"'{op}' carries no payload but {len(payload)} frames arrived", rid)
    return _BUILD[op](kwargs)


def decode_ok(frames: Sequence[Any]) -> Ok | None:
    """The `ok` reply in `frames`, or None for anything else (unreadable, an error reply).

    For answers a peer only learns from (heartbeat replies): nothing in them is worth an exception.
    """
    try:
        msg = decode(frames)
    except ProtocolError:
        return None
    return msg if isinstance(msg, Ok) else None


def raise_if_error(msg: Message) -> Message:
    """Return `msg` unless it is an `error` reply, which becomes ProtocolError."""
    if isinstance(msg, Error):
        try:
            code = ErrorCode(msg.code)
        except ValueError:
            code = ErrorCode.INTERNAL
        raise ProtocolError(code, msg.message, rid=msg.rid)
    return msg


def sizes(frames: Iterable[Any]) -> int:
    """Total bytes of `frames`, for byte counters."""
    return sum([memoryview(f).nbytes for f in frames])
