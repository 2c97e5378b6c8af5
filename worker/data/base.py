"""The dataset interface every source implements, and the in-memory kind.

A dataset hands out examples by index (`take`), never the whole set, so a
worker touches only the rows of its own partition and a lazily generated
set of any size costs nothing until it is read.
"""
from __future__ import annotations

import numpy as np


class DataError(ValueError):
    """A data source that cannot be used; the message is one sentence naming
    the source or file, what was expected and what was found."""


class Dataset:
    """Examples by index: `take(idx) -> (x float32 (k, *input_shape), y int64 (k,))`."""

    input_shape: tuple[int, ...] = ()
    num_classes: int = 0
    name: str = "dataset"

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, n={len(self)}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")


def as_index_array(idx, n: int) -> np.ndarray:
    """`idx` as a 1-D int64 array, every entry checked against range(n).

    Negative indices are refused rather than wrapped: a negative index here
    is a bug in the caller's arithmetic, not a request for the last row.
    """
    arr = np.asarray(idx)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and arr.dtype.kind not in "iu":
        raise IndexError(f"example indices must be integers, found dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= n):
        raise IndexError(f"example index out of range: dataset has {n} examples, "
                         f"indices span [{int(arr.min())}, {int(arr.max())}]")
    return arr


class ArrayDataset(Dataset):
    """Rows of an in-memory array, optionally through an index view.

    `x` keeps its stored dtype (uint8 pixels stay uint8: MNIST's 47 MB do
    not become 188 MB of float32); `take` converts only the rows it returns,
    multiplying by `scale`. `rows` selects (and orders) the rows this
    dataset exposes, so a train/test split shares one array with no copy.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, *, num_classes: int,
                 scale: float = 1.0, rows: np.ndarray | None = None, name: str = "arrays"):
        if len(x) != len(y):
            raise DataError(f"{name}: expected as many labels as examples, "
                            f"found {len(x)} examples and {len(y)} labels")
        self._x = x
        self._y = np.asarray(y, dtype=np.int64)
        self._scale = float(scale)
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.input_shape = tuple(int(d) for d in x.shape[1:])
        self.num_classes = int(num_classes)
        self.name = name

    def __len__(self) -> int:
        return len(self._x) if self._rows is None else len(self._rows)

    def take(self, idx) -> tuple[np.ndarray, np.ndarray]:
        sel = as_index_array(idx, len(self))
        if self._rows is not None:
            sel = self._rows[sel]
        x = self._x[sel].astype(np.float32)
        if self._scale != 1.0:
            x *= np.float32(self._scale)
        return x, self._y[sel].copy()

    def subset(self, rows: np.ndarray, *, name: str | None = None) -> ArrayDataset:
        """The rows `rows` of this dataset (positions in it), sharing storage."""
        rows = as_index_array(rows, len(self))
        base = rows if self._rows is None else self._rows[rows]
        return ArrayDataset(self._x, self._y, num_classes=self.num_classes,
                            scale=self._scale, rows=base, name=name or self.name)


def split_holdout(ds: ArrayDataset, test_fraction: float, *, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """A seeded (train, test) split: `round(n * test_fraction)` test rows, at
    least one of each side. The same seed gives the same split everywhere,
    so every worker of a job agrees on what is held out."""
    n = len(ds)
    if n < 2:
        raise DataError(f"{ds.name}: expected at least 2 examples to hold out a test split, found {n}")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"{ds.name}: expected test_fraction in (0, 1), found {test_fraction!r}")
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    perm = np.random.default_rng([int(seed), 0x5EED]).permutation(n)
    return (ds.subset(perm[n_test:], name=f"{ds.name} (train)"),
            ds.subset(perm[:n_test], name=f"{ds.name} (test)"))
