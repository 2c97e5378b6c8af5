"""Layers: each forward sits beside its backward (micrograd's shape, vectorised).

Every layer follows one contract:

- `forward(x, train=True)` returns the output and caches what backward needs;
- `backward(dout, *, accumulate=False, need_dx=True)` returns the input
  gradient (None when `need_dx` is False) and writes the parameter gradients
  into `grads` -- overwriting them, or adding to them with `accumulate`;
- `params` / `grads` hold the learned arrays under short keys ("W", "b"),
  `stats` the non-learned ones ("running_mean"); the Model prefixes them with
  the layer's name ("dense0.W"). The dicts are filled once and their arrays
  are updated in place, never replaced, so outside references stay valid.

Arrays come from `xp` (numpy or cupy); nothing here calls numpy on a device
array. Layers built with `inplace=True` may overwrite their input in forward
and `dout` in backward: the Model sets it only where the producer of that
array no longer needs it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from worker.nn.init import init_weight


class Layer:
    """Base class: no parameters, no statistics."""

    kind = "layer"  # name stem the Model numbers: dense0, relu1, ...

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.grads: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}
        self.name = self.kind

    def forward(self, x: Any, train: bool = True) -> Any:
        raise NotImplementedError

    def backward(self, dout: Any, *, accumulate: bool = False, need_dx: bool = True) -> Any:
        raise NotImplementedError

    def __call__(self, x: Any, train: bool = True) -> Any:
        return self.forward(x, train)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"

    def _set_grad(self, key: str, value: Any, accumulate: bool) -> None:
        if accumulate:
            self.grads[key] += value
        else:
            self.grads[key][...] = value


class Dense(Layer):
    """y = x @ W + b with W of shape (in, out)."""

    kind = "dense"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        init: str = "he",
        rng: np.random.Generator | None = None,
        xp: Any = np,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        rng = np.random.default_rng(0) if rng is None else rng
        shape = (in_features, out_features)
        self.params["W"] = init_weight(
            init, shape, in_features, out_features, rng, xp=xp, dtype=dtype
        )
        self.params["b"] = xp.zeros(out_features, dtype=dtype)
        # zeros, not zeros_like: a large one is mapped untouched, and costs no memory until written
        # (a worker that sends dW in row blocks never writes it: `backward(defer_w=True)`).
        self.grads = {k: xp.zeros(v.shape, dtype=v.dtype) for k, v in self.params.items()}
        self.xp = xp
        self._x: Any = None
        self._dout: Any = None

    def forward(self, x: Any, train: bool = True) -> Any:
        self._x = x
        out = self.xp.matmul(x, self.params["W"])
        out += self.params["b"]
        return out

    def backward(self, dout: Any, *, accumulate: bool = False, need_dx: bool = True,
                 defer_w: bool = False) -> Any:
        """Gradients of the last forward. `defer_w`: leave dW uncomputed (grads["W"] untouched)
        and keep dout, so the caller takes dW in row blocks (`grad_rows`) and sends each as it
        is made: the worker never holds the whole dW (worker/task.py)."""
        xp, x = self.xp, self._x
        if defer_w:
            self._dout = dout
            xp.sum(dout, axis=0, out=self.grads["b"])
        elif accumulate:
            self.grads["W"] += xp.matmul(x.T, dout)
            self.grads["b"] += dout.sum(axis=0)
        else:
            # BLAS takes x.T as a transposed operand: no copy, written in place.
            xp.matmul(x.T, dout, out=self.grads["W"])
            xp.sum(dout, axis=0, out=self.grads["b"])
        if not need_dx:
            return None
        return xp.matmul(dout, self.params["W"].T)

    def grad_rows(self, start: int, stop: int) -> Any:
        """Rows start:stop of dW (a new array) after a `backward(defer_w=True)`."""
        return self.xp.matmul(self._x[:, start:stop].T, self._dout)


class Flatten(Layer):
    """(N, ...) -> (N, prod(...)); a view when the input is contiguous."""

    kind = "flatten"

    def __init__(self) -> None:
        super().__init__()
        self._shape: tuple[int, ...] = ()

    def forward(self, x: Any, train: bool = True) -> Any:
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout: Any, *, accumulate: bool = False, need_dx: bool = True) -> Any:
        return dout.reshape(self._shape) if need_dx else None


class _Activation(Layer):
    def __init__(self, *, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def _out(self, x: Any) -> Any:
        return x if self.inplace else None


class ReLU(_Activation):
    """max(x, 0); backward uses the output's sign, so in place is safe."""

    kind = "relu"

    def forward(self, x: Any, train: bool = True) -> Any:
        xp = xp_of(x)
        self._y = xp.maximum(x, 0, out=self._out(x))
        return self._y

    def backward(self, dout: Any, *, accumulate: bool = False, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        xp = xp_of(dout)
        return xp.multiply(dout, self._y > 0, out=dout if self.inplace else None)


class LeakyReLU(_Activation):
    """x for x > 0, alpha * x otherwise (alpha >= 0)."""

    kind = "leaky_relu"

    def __init__(self, alpha: float = 0.01, *, inplace: bool = False) -> None:
        super().__init__(inplace=inplace)
        if alpha < 0:
            raise ValueError(f"LeakyReLU alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)

    def forward(self, x: Any, train: bool = True) -> Any:
        xp = xp_of(x)
        one = xp.asarray(1, dtype=x.dtype)
        alpha = xp.asarray(self.alpha, dtype=x.dtype)
        self._slope = xp.where(x > 0, one, alpha)
        return xp.multiply(x, self._slope, out=self._out(x))

    def backward(self, dout: Any, *, accumulate: bool = False, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        return xp_of(dout).multiply(dout, self._slope, out=dout if self.inplace else None)


class Tanh(_Activation):
    """tanh(x); backward is dout * (1 - y^2)."""

    kind = "tanh"

    def forward(self, x: Any, train: bool = True) -> Any:
        self._y = xp_of(x).tanh(x, out=self._out(x))
        return self._y

    def backward(self, dout: Any, *, accumulate: bool = False, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        xp, y = xp_of(dout), self._y
        local = xp.multiply(y, y)
        xp.subtract(1, local, out=local)
        return xp.multiply(dout, local, out=dout if self.inplace else None)


class Sigmoid(_Activation):
    """1 / (1 + exp(-x)), computed as (1 + tanh(x/2)) / 2: no overflow for large |x|."""

    kind = "sigmoid"

    def forward(self, x: Any, train: bool = True) -> Any:
        xp = xp_of(x)
        y = xp.multiply(x, 0.5, out=self._out(x))
        xp.tanh(y, out=y)
        y += 1
        y *= 0.5
        self._y = y
        return y

    def backward(self, dout: Any, *, accumulate: bool = False, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        y = self._y
        local = 1 - y
        local *= y
        return xp_of(dout).multiply(dout, local, out=dout if self.inplace else None)


class Dropout(Layer):
    """Inverted dropout: drops with probability p in training and scales the
    kept values by 1/(1-p), so evaluation is the identity.

    The mask comes from a seeded generator of `xp`; `set_mask(keep)` fixes it
    (gradient checks), `set_mask(None)` returns to random masks, `reseed(s)`
    restarts the stream (e.g. one stream per worker).
    """

    kind = "dropout"

    def __init__(self, p: float, *, seed: int = 0, xp: Any = np) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout p must be in [0, 1), got {p}")
        self.p = float(p)
        self.xp = xp
        self.reseed(seed)
        self._fixed: Any = None
        self._mask: Any = None

    def reseed(self, seed: int) -> None:
        """Restart the mask stream from `seed`."""
        self._rng = _make_rng(self.xp, seed)

    def set_mask(self, keep: Any) -> None:
        """Fix the keep-mask (booleans or 0/1, shape of the input); None unfixes it."""
        self._fixed = None if keep is None else self.xp.asarray(keep).astype(bool)

    def forward(self, x: Any, train: bool = True) -> Any:
        if not train or self.p == 0.0:
            self._mask = None
            return x
        if self._fixed is not None:
            if self._fixed.shape != x.shape:
                raise ValueError(
                    f"fixed dropout mask has shape {self._fixed.shape}, input has {x.shape}"
                )
            keep = self._fixed
        else:
            keep = _uniform(self._rng, x.shape, x.dtype) >= self.p
        mask = keep.astype(x.dtype)
        mask *= 1.0 / (1.0 - self.p)
        self._mask = mask
        # Not in place: x is the activation's output, which Tanh and Sigmoid
        # keep for their own backward.
        return x * mask

    def backward(self, dout: Any, *, accumulate: bool = False, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        return dout if self._mask is None else dout * self._mask


def xp_of(array: Any) -> Any:
    """Return the array module of `array`; cupy is imported only for cupy arrays."""
    if isinstance(array, np.ndarray):
        return np
    from worker.device import array_module

    return array_module(array)


def _make_rng(xp: Any, seed: int) -> Any:
    return xp.random.default_rng(seed)


def _uniform(rng: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """Uniform [0, 1) draws of `dtype` where the generator can make them directly."""
    dtype = np.dtype(dtype)
    if dtype in (np.float32, np.float64):
        try:
            return rng.random(shape, dtype=dtype)
        except TypeError:  # a generator without the dtype argument
            pass
    return rng.random(shape).astype(dtype)
