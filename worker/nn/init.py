"""Weight initialisers: He and Xavier (Glorot), both from a normal distribution.

Values are drawn on the host by a numpy Generator in float64, then cast and
moved to the array module, so one seed gives bit-identical weights on numpy
and on cupy, whatever the dtype.

- he:     N(0, 2 / fan_in)              -- for ReLU-family activations
- xavier: N(0, 2 / (fan_in + fan_out))  -- for tanh / sigmoid

Biases start at zero, BatchNorm gamma at one and beta at zero, running mean
at zero and running variance at one (the layers do that themselves).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

INIT_NAMES = ("he", "xavier")
# Values drawn at a time (float64, 8 MiB).
INIT_CHUNK = 1 << 20


def init_std(kind: str, fan_in: int, fan_out: int) -> float:
    """Return the standard deviation of initialiser `kind` for the given fans."""
    if kind == "he":
        return math.sqrt(2.0 / fan_in)
    if kind == "xavier":
        return math.sqrt(2.0 / (fan_in + fan_out))
    raise ValueError(f"unknown initialiser {kind!r}: choose one of {', '.join(INIT_NAMES)}")


def init_weight(
    kind: str,
    shape: tuple[int, ...],
    fan_in: int,
    fan_out: int,
    rng: np.random.Generator,
    *,
    xp: Any = np,
    dtype: Any = np.float32,
) -> Any:
    """Draw a weight array of `shape` from `rng` (host side) and return it on `xp`.

    Drawn in chunks of INIT_CHUNK values: the same stream as one draw of the
    whole array (the generator is sequential), without a float64 copy of it,
    which for a 400 MB layer would be 800 MB more at the worker's peak.
    """
    std = init_std(kind, fan_in, fan_out)
    host = np.empty(shape, dtype=dtype)
    flat = host.reshape(-1)
    draw = np.empty(min(INIT_CHUNK, flat.size), dtype=np.float64)
    for lo in range(0, flat.size, INIT_CHUNK):
        chunk = draw[:min(INIT_CHUNK, flat.size - lo)]
        rng.standard_normal(chunk.size, out=chunk)
        chunk *= std
        flat[lo:lo + chunk.size] = chunk
    return xp.asarray(host)
