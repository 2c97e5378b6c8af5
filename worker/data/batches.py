"""Which examples a worker owns (`partition`) and in what order it sees them (`Batches`).

Both are pure functions of their arguments, so a replacement worker that
picks up partition k at step t reads exactly the batches the dead one
would have read, and the single-process reference trainer can replay the
data order of any number of workers.
"""
from __future__ import annotations

import math

import numpy as np

from worker.data.base import Dataset


def partition(n: int, k: int, num: int, *, seed: int = 0) -> np.ndarray:
    """Indices (into range(n)) of data partition k of num.

    Strided: partition k holds k, k + num, k + 2*num, ... So partitions are
    disjoint, cover range(n), differ in size by at most one, cost O(n/num)
    memory (no permutation of a 10-million-row set), and a set stored in
    class order is still spread evenly. Sets whose stored order matters are
    already shuffled by their held-out split, and `Batches` shuffles each
    epoch, so `seed` is accepted for the signature but the cut needs none.
    """
    del seed
    if not isinstance(num, (int, np.integer)) or num < 1:
        raise ValueError(f"partition count must be an integer >= 1, found {num!r}")
    if not isinstance(k, (int, np.integer)) or not 0 <= k < num:
        raise ValueError(f"partition index must be in 0..{num - 1}, found {k!r}")
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"example count must be an integer >= 0, found {n!r}")
    return np.arange(int(k), int(n), int(num), dtype=np.int64)


class Batches:
    """Deterministic mini-batches over `indices` of `dataset`.

    `batch(step)` is a pure function of (seed, step): epoch = step //
    steps_per_epoch; each epoch is a fresh seeded permutation of `indices`
    (seeded by (seed, stream, epoch); workers use stream = partition index
    so their orders are independent), cut in consecutive slices of batch_size.

    steps_per_epoch = ceil(len(indices) / batch_size), and every batch is
    full: the last slice of an epoch is topped up from the start of that
    same epoch's permutation (and a partition smaller than one batch is
    repeated). Full batches keep the batch divisible into the job's
    micro-batches and every step's gradient equally weighted; each example
    is still seen at least once per epoch.
    """

    def __init__(self, dataset: Dataset, indices: np.ndarray, batch_size: int, *,
                 seed: int = 0, stream: int = 0):
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) == 0:
            raise ValueError(f"{dataset.name}: cannot make batches from an empty partition")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size!r}")
        self.dataset = dataset
        self.indices = indices
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.stream = int(stream)
        self.steps_per_epoch = math.ceil(len(indices) / self.batch_size)
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of positions in `indices` used in `epoch`."""
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, self.stream, int(epoch)]).permutation(len(self.indices))
            self._epoch = epoch
        return self._perm

    def batch_indices(self, step: int) -> np.ndarray:
        """Dataset indices of the batch at `step` (>= 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, found {step}")
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        perm = self.order(epoch)
        start = pos * self.batch_size
        where = np.arange(start, start + self.batch_size) % len(perm)
        return self.indices[perm[where]]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the batch at `step`: x float32 (batch_size, *input_shape), y int64."""
        return self.dataset.take(self.batch_indices(step))


def worker_batches(dataset: Dataset, *, k: int, num: int, batch_size: int, seed: int) -> Batches:
    """The batches worker k of num reads: its strided partition, shuffled
    per epoch with stream k. The one place this convention lives; the
    worker daemon and the reference trainer both call it."""
    return Batches(dataset, partition(len(dataset), k, num), batch_size, seed=seed, stream=k)
