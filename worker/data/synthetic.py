"""Seeded synthetic classification sets of any size, generated on demand.

Gaussian class clusters: class c has a mean vector m_c (drawn once from the
seed, norm `separation`), and example i is (m_{y_i} + noise * z_i, y_i).
Nothing of size n is ever stored. Every random number is a pure function
of (seed, example index, feature index) -- a splitmix64 hash, turned into
a uniform label and Box-Muller normals -- so `take` of any indices, in any
order, from any process, gives the same rows, and a 10,000,000-example set
costs only its (classes x features) means table.

Train examples are indices [0, n), test examples [n, n + test): disjoint
by construction, from the same distribution.
"""
from __future__ import annotations

import math

import numpy as np

from worker.data.base import Dataset, as_index_array

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_LABEL_STREAM = np.uint64(0x6C8E9CF570932BD5)
_TWO_PI = 2.0 * math.pi
_INV_2_32 = 1.0 / 4294967296.0

DEFAULT_FEATURES = 32
DEFAULT_CLASSES = 10
DEFAULT_SEPARATION = 4.0   # distance scale of the class means; ~98% of examples separable at noise 1
DEFAULT_NOISE = 1.0        # per-feature standard deviation around the class mean


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MUL1
        z = (z ^ (z >> np.uint64(27))) * _MUL2
        return z ^ (z >> np.uint64(31))


class SyntheticDataset(Dataset):
    """Examples [offset, offset + n) of the synthetic stream keyed by `seed`.

    Two instances with the same (seed, features/shape, classes, separation,
    noise) see the same stream; train and test differ only in `offset`.
    """

    def __init__(self, n: int, *, offset: int = 0, input_shape: tuple[int, ...] = (DEFAULT_FEATURES,),
                 classes: int = DEFAULT_CLASSES, separation: float = DEFAULT_SEPARATION,
                 noise: float = DEFAULT_NOISE, seed: int = 0, name: str = "synthetic"):
        self._n = int(n)
        self._offset = int(offset)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(classes)
        self.name = name
        self.features = math.prod(self.input_shape)
        self.seed = int(seed)
        self.noise = float(noise)
        self.separation = float(separation)
        self._key = _mix(np.array([self.seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
        means = np.random.default_rng([self.seed, 0xC1A55]).standard_normal((self.num_classes, self.features))
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        self.means = (means / np.maximum(norms, 1e-12) * self.separation).astype(np.float32)

    def __len__(self) -> int:
        return self._n

    def labels(self, idx) -> np.ndarray:
        """Labels of examples `idx` (positions in this dataset), int64."""
        g = as_index_array(idx, self._n) + self._offset
        return self._labels(self._example_keys(g))

    def _example_keys(self, g: np.ndarray) -> np.ndarray:
        return _mix(g.astype(np.uint64) ^ self._key)

    def _labels(self, keys: np.ndarray) -> np.ndarray:
        return (_mix(keys ^ _LABEL_STREAM) % np.uint64(self.num_classes)).astype(np.int64)

    def _normals(self, keys: np.ndarray) -> np.ndarray:
        """(k, features) standard normals: one 64-bit hash per pair of features."""
        pairs = (self.features + 1) // 2
        with np.errstate(over="ignore"):
            j = (np.arange(1, pairs + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        h = _mix(keys[:, None] ^ j)
        u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) * _INV_2_32   # (0, 1): log is finite
        u2 = ((h & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) * _INV_2_32
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.empty((len(keys), 2 * pairs), dtype=np.float64)
        z[:, 0::2] = r * np.cos(_TWO_PI * u2)
        z[:, 1::2] = r * np.sin(_TWO_PI * u2)
        return z[:, : self.features]

    def take(self, idx) -> tuple[np.ndarray, np.ndarray]:
        g = as_index_array(idx, self._n) + self._offset
        keys = self._example_keys(g)
        y = self._labels(keys)
        x = self.means[y] + np.float32(self.noise) * self._normals(keys).astype(np.float32)
        return x.reshape((len(g),) + self.input_shape), y
