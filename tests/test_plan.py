"""The partition plan: coverage, size bound, balance, determinism, wire form."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ErrorCode, ProtocolError
from protocol.plan import Plan, make_plan

shapes = st.lists(st.integers(0, 20), min_size=0, max_size=3).map(tuple)
tensor_sets = st.dictionaries(
    st.text("abcdefgh.0123", min_size=1, max_size=8), st.tuples(shapes, st.sampled_from(["float32", "float64"])),
    min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(tensors=tensor_sets, shards=st.integers(1, 7), partition_bytes=st.integers(64, 3000))
def test_plan_properties(tensors, shards, partition_bytes):
    plan = make_plan(tensors, shards, partition_bytes)
    # every element of every tensor lands in exactly one slice
    for name, (shape, dtype) in tensors.items():
        size = int(np.prod(shape, dtype=np.int64))
        hits = np.zeros(size, dtype=np.int64)
        for s in plan.slices_of(name):
            assert s.dtype == dtype
            hits[s.start:s.stop] += 1
        assert (hits == 1).all()
    # no slice exceeds partition_bytes
    assert all(s.nbytes <= partition_bytes for s in plan.slices)
    # shard byte loads differ by at most one slice
    loads = plan.shard_bytes()
    largest = max(s.nbytes for s in plan.slices)
    assert max(loads) - min(loads) <= largest
    # slice ids are 0..n-1 and shards in range
    assert [s.sid for s in plan.slices] == list(range(len(plan.slices)))
    assert all(0 <= s.shard < shards for s in plan.slices)
    # same inputs, same plan, whatever the order the tensors are given in
    again = make_plan(dict(reversed(list(tensors.items()))), shards, partition_bytes)
    assert again == plan and again.digest == plan.digest


def test_large_tensor_spreads_over_every_shard_small_lives_whole():
    plan = make_plan({"big": ((1024, 1024), "float32"), "bias": ((10,), "float32")}, 2, 1 << 20)
    assert {s.shard for s in plan.slices_of("big")} == {0, 1}
    assert len(plan.slices_of("bias")) == 1
    assert plan.shard_bytes()[0] + plan.shard_bytes()[1] == 4 * (1024 * 1024 + 10)


def test_slices_are_near_equal():
    plan = make_plan({"t": ((10,), "float32")}, 1, 12)  # 3 floats at most per slice
    assert [s.count for s in plan.slices] == [3, 3, 2, 2]


def test_wire_round_trip_and_digest_check():
    plan = make_plan({"a": ((30, 3), "float32"), "b": ((0,), "float32")}, 3, 64)
    assert Plan.from_wire(plan.to_wire()) == plan
    wire = plan.to_wire()
    wire["num_shards"] = 2
    with pytest.raises(ProtocolError) as info:
        Plan.from_wire(wire)
    assert info.value.code is ErrorCode.BAD_PLAN and "digest" in info.value.message


@pytest.mark.parametrize("wire", [None, {"tensors": "x"}, {"tensors": [["a", [2], "float32"]], "num_shards": 0,
                                                           "partition_bytes": 8, "digest": ""},
                                  {"tensors": [["a", [-2], "float32"]], "num_shards": 1, "partition_bytes": 8},
                                  {"tensors": [["a", [2], "complex64"]], "num_shards": 1, "partition_bytes": 8}])
def test_malformed_wire_plans_are_refused(wire):
    with pytest.raises(ProtocolError) as info:
        Plan.from_wire(wire)
    assert info.value.code is ErrorCode.BAD_PLAN


@pytest.mark.parametrize("args", [({"a": ((2,), "float32")}, 0, 8), ({"a": ((2,), "float32")}, 1, 2),
                                  ({"": ((2,), "float32")}, 1, 8), ({"a": ((2,), "int8")}, 1, 8)])
def test_bad_inputs_raise(args):
    with pytest.raises(ValueError):
        make_plan(*args)
