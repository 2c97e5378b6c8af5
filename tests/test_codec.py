"""The codec: every message kind round-trips; decode refuses what it must."""
from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol import codec
from protocol.codec import decode, encode, raise_if_error
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import KINDS, Error, Ok, Push, SliceData
from protocol.version import ALLOWED_DTYPES, PROTOCOL_VERSION

SAMPLE_VALUES = {
    "int": 7, "float": 2.5, "str": "abc", "bool": True,
    "dict": {"a": 1, "b": [1, 2], "c": {"d": "e"}}, "list": ["x", "y"],
}


def sample(cls):
    """An instance of `cls` with every field set to a non-default value."""
    kwargs = {"rid": 11, "job": "job-1", "worker": "w-3", "clock": 4}
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            continue
        if f.name == "slices":
            kwargs["slices"] = (SliceData(0, np.arange(6, dtype=np.float32).reshape(2, 3)),
                                SliceData(5, np.array([1, 2], dtype=np.int64)))
        elif f.metadata.get("items") is int:
            kwargs[f.name] = [1, 2, 3]
        elif f.metadata.get("items") is str:
            kwargs[f.name] = ["a", "b"]
        elif f.metadata.get("values") is int:
            kwargs[f.name] = {"w1": 0, "w2": -1}
        elif f.metadata.get("values") is str:
            kwargs[f.name] = {"p0": "w1", "p1": ""}
        else:
            kwargs[f.name] = SAMPLE_VALUES[f.type]
    return cls(**kwargs)


@pytest.mark.parametrize("op", sorted(KINDS))
def test_every_kind_round_trips(op):
    msg = sample(KINDS[op])
    frames = encode(msg)
    assert decode(frames) == msg
    # and with frames as bytes, the way they arrive off a socket
    assert decode([bytes(memoryview(f)) for f in frames]) == msg


@pytest.mark.parametrize("op", sorted(KINDS))
def test_every_kind_round_trips_with_defaults(op):
    msg = KINDS[op]()
    assert decode(encode(msg)) == msg


def test_payload_is_sent_without_copy_and_received_without_copy():
    arr = np.arange(1000, dtype=np.float32)
    frames = encode(Push(slices=(SliceData(3, arr),)))
    assert np.shares_memory(frames[1], arr)
    raw = bytearray(memoryview(frames[1]).tobytes())
    got = decode([frames[0], raw]).slices[0].data
    assert np.shares_memory(got, np.frombuffer(raw, dtype=np.uint8))


@settings(max_examples=150, deadline=None)
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from(ALLOWED_DTYPES),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    ),
    step=st.integers(1, 3),
    transpose=st.booleans(),
    sid=st.integers(0, 2**31),
)
def test_arrays_round_trip_any_dtype_and_shape(arr, step, transpose, sid):
    view = arr[::step] if arr.ndim else arr  # non-contiguous when step > 1
    if transpose:
        view = view.T
    got = decode(encode(Ok(slices=(SliceData(sid, view),)))).slices[0]
    assert got.sid == sid
    assert got.data.dtype == view.dtype and got.data.shape == view.shape
    np.testing.assert_array_equal(got.data, view)


def test_error_reply_becomes_protocol_error():
    with pytest.raises(ProtocolError) as info:
        raise_if_error(decode(codec.error_frames(9, ErrorCode.BAD_DTYPE, "slice 3 is float32")))
    assert info.value.code is ErrorCode.BAD_DTYPE and info.value.rid == 9
    assert "slice 3" in str(info.value)


def header(**fields):
    base = {"v": PROTOCOL_VERSION, "op": "push", "rid": 5, "job": "j", "worker": "w", "clock": 0,
            "base_version": -1, "norm": -1.0, "s": []}
    base.update(fields)
    return msgpack.packb(base)


BAD = {
    "garbage bytes": ([b"\xc1\xff\x00garbage"], ErrorCode.BAD_FRAME),
    "empty message": ([], ErrorCode.BAD_FRAME),
    "header not a map": ([msgpack.packb([1, 2])], ErrorCode.BAD_FRAME),
    "wrong version": ([header(v=99)], ErrorCode.BAD_VERSION),
    "unknown op": ([header(op="frobnicate")], ErrorCode.UNKNOWN_OP),
    "rid not an int": ([header(rid="five")], ErrorCode.BAD_FIELD),
    "job not a str": ([header(job=5)], ErrorCode.BAD_FIELD),
    "clock a bool": ([header(clock=True)], ErrorCode.BAD_FIELD),
    "norm a string": ([header(norm="x")], ErrorCode.BAD_FIELD),
    "unknown field": ([header(colour="red")], ErrorCode.BAD_FIELD),
    "clock negative": ([header(clock=-5)], ErrorCode.BAD_CLOCK),
    "clock huge": ([header(clock=2**50)], ErrorCode.BAD_CLOCK),
    "dtype not allowed": ([header(s=[[0, "object", 1, [1]]]), b"x" * 8], ErrorCode.BAD_DTYPE),
    "dtype complex": ([header(s=[[0, "complex128", 1, [1]]]), b"x" * 16], ErrorCode.BAD_DTYPE),
    "length mismatch": ([header(s=[[0, "float32", 4, [4]]]), b"x" * 15], ErrorCode.BAD_LENGTH),
    "truncated frames": ([header(s=[[0, "float32", 1, [1]], [1, "float32", 1, [1]]]), b"x" * 4],
                         ErrorCode.TRUNCATED),
    "extra frames": ([header(s=[]), b"x" * 4], ErrorCode.TRUNCATED),
    "payload on payload-less op": ([msgpack.packb({"v": PROTOCOL_VERSION, "op": "stats", "rid": 1}), b"x"],
                                   ErrorCode.TRUNCATED),
    "duplicate slice": ([header(s=[[0, "float32", 1, [1]], [0, "float32", 1, [1]]]), b"x" * 4, b"y" * 4],
                        ErrorCode.BAD_FIELD),
    "shape disagrees with count": ([header(s=[[0, "float32", 4, [3]]]), b"x" * 16], ErrorCode.BAD_FIELD),
    "negative slice id": ([header(s=[[-1, "float32", 1, [1]]]), b"x" * 4], ErrorCode.BAD_FIELD),
    "meta not a list": ([header(s=[{"sid": 0}]), b"x" * 4], ErrorCode.BAD_FIELD),
    "nan norm": ([header(norm=float("nan"))], ErrorCode.BAD_FIELD),
    "sids with strings": ([msgpack.packb({"v": PROTOCOL_VERSION, "op": "pull", "rid": 1, "sids": ["a"]})],
                          ErrorCode.BAD_FIELD),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_decode_refuses(case):
    frames, code = BAD[case]
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.code is code, str(info.value)
    assert str(info.value)  # a sentence, not empty


def test_too_large_is_refused_before_use():
    frames = [header(s=[[0, "uint8", 2000, [2000]]]), b"x" * 2000]
    with pytest.raises(ProtocolError) as info:
        decode(frames, max_message_bytes=1000)
    assert info.value.code is ErrorCode.TOO_LARGE and info.value.rid == 5


def test_error_carries_request_id_when_known():
    with pytest.raises(ProtocolError) as info:
        decode([header(rid=77, s=[[0, "float32", 4, [4]]]), b"x"])
    assert info.value.rid == 77


def test_encode_refuses_disallowed_dtype():
    with pytest.raises(ValueError, match="cannot travel"):
        encode(Push(slices=(SliceData(0, np.zeros(2, dtype=np.complex64)),)))


def test_error_message_round_trip():
    msg = Error(rid=3, code="bad_dtype", message="no", detail={"clock": 4})
    assert decode(encode(msg)) == msg


def test_non_native_byte_order_travels_by_value():
    big_endian = np.arange(5, dtype=">f4")
    got = decode(encode(Ok(slices=(SliceData(1, big_endian),)))).slices[0].data
    assert got.dtype == np.float32 and got.dtype.isnative
    np.testing.assert_array_equal(got, np.arange(5, dtype=np.float32))
