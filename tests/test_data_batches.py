"""worker.data: partitions and deterministic batches."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.data import Batches, load_dataset, partition, worker_batches
from worker.data.base import ArrayDataset


def numbered(n: int) -> ArrayDataset:
    """A dataset whose example i has x == i and y == i % 10: batches show their indices."""
    return ArrayDataset(np.arange(n, dtype=np.float64)[:, None], np.arange(n) % 10, num_classes=10)


@pytest.mark.parametrize("n, num", [(0, 1), (1, 1), (1, 3), (10, 3), (1797, 2), (1437, 7), (100, 100), (5, 8)])
def test_partition_disjoint_covering_balanced(n, num):
    parts = [partition(n, k, num) for k in range(num)]
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(p.dtype == np.int64 for p in parts)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 5000), num=st.integers(1, 40))
def test_partition_property(n, num):
    parts = [partition(n, k, num) for k in range(num)]
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n
    assert ((joined >= 0) & (joined < n)).all()
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_partition_is_cheap_for_huge_n():
    p = partition(10_000_000, 3, 4)
    assert len(p) == 2_500_000 and p[0] == 3 and p[-1] == 9_999_999


@pytest.mark.parametrize("args", [(10, 3, 3), (10, -1, 3), (10, 0, 0), (-1, 0, 1)])
def test_partition_refuses_bad_arguments(args):
    with pytest.raises(ValueError):
        partition(*args)


def test_batches_deterministic_and_full():
    ds = numbered(103)
    idx = partition(103, 1, 2)  # 51 odd numbers
    a = Batches(ds, idx, 8, seed=4)
    b = Batches(ds, idx, 8, seed=4)
    assert a.steps_per_epoch == 7   # ceil(51 / 8)
    # visiting steps out of order gives the same batches
    for step in [0, 13, 6, 7, 0, 20, 1]:
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert xa.shape == (8, 1) and xa.dtype == np.float32 and ya.dtype == np.int64
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert set(xa[:, 0].astype(int)) <= set(idx.tolist())


def test_batches_each_epoch_covers_partition_and_reshuffles():
    ds = numbered(100)
    idx = partition(100, 0, 3)   # 34 examples
    b = Batches(ds, idx, 10, seed=0)
    spe = b.steps_per_epoch
    assert spe == 4

    def epoch(e):
        return np.concatenate([b.batch_indices(e * spe + s) for s in range(spe)])

    e0, e1 = epoch(0), epoch(1)
    assert len(e0) == 40
    assert set(e0.tolist()) == set(idx.tolist()) == set(e1.tolist())
    # the 6 top-up examples of the last batch are the epoch's first ones
    assert np.array_equal(e0[34:], e0[:6])
    assert not np.array_equal(e0[:34], e1[:34])      # a fresh order each epoch
    assert np.array_equal(epoch(0), e0)              # ...and the same one when asked again


def test_batches_seed_and_stream_change_the_order():
    ds = numbered(64)
    idx = np.arange(64)
    base = Batches(ds, idx, 16, seed=0).batch_indices(0)
    assert not np.array_equal(base, Batches(ds, idx, 16, seed=1).batch_indices(0))
    assert not np.array_equal(base, Batches(ds, idx, 16, seed=0, stream=1).batch_indices(0))


def test_batches_smaller_partition_than_batch_repeats():
    ds = numbered(10)
    b = Batches(ds, np.array([2, 5, 7]), 8)
    assert b.steps_per_epoch == 1
    got = b.batch_indices(0)
    assert len(got) == 8 and set(got.tolist()) == {2, 5, 7}


def test_batches_refuse_empty_and_bad_step():
    with pytest.raises(ValueError, match="empty partition"):
        Batches(numbered(3), np.array([], np.int64), 2)
    with pytest.raises(ValueError):
        Batches(numbered(3), np.arange(3), 2).batch(-1)


def test_worker_batches_partition_the_train_set():
    train, _ = load_dataset({"source": "sklearn:digits", "test_fraction": 0.2}, seed=0)
    seen = []
    for k in range(3):
        wb = worker_batches(train, k=k, num=3, batch_size=32, seed=0)
        seen.append(set(np.concatenate([wb.batch_indices(s) for s in range(wb.steps_per_epoch)]).tolist()))
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    assert set().union(*seen) == set(range(len(train)))


def test_synthetic_batches_are_reproducible():
    train, _ = load_dataset({"source": "synthetic:n=10000000", "test_fraction": 0.2}, seed=0)
    wb = worker_batches(train, k=1, num=4, batch_size=64, seed=3)
    x1, y1 = wb.batch(123_456)
    x2, y2 = worker_batches(train, k=1, num=4, batch_size=64, seed=3).batch(123_456)
    assert x1.shape == (64, 32) and np.array_equal(x1, x2) and np.array_equal(y1, y2)
