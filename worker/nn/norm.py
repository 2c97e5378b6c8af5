"""Batch normalisation over features (N, F) or over channels (N, C, H, W).

Training normalises with the batch's mean and (biased) variance and moves the
running statistics towards them:

    running_mean = (1 - momentum) * running_mean + momentum * batch_mean
    running_var  = (1 - momentum) * running_var  + momentum * batch_var_unbiased

(PyTorch's convention, momentum 0.1; the running variance uses the unbiased
m/(m-1) estimate, m = the number of values per feature). Evaluation
normalises with the running statistics and changes nothing.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from worker.nn.layers import Layer

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


class BatchNorm(Layer):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta, per feature or channel."""

    kind = "bn"

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = BN_MOMENTUM,
        eps: float = BN_EPS,
        xp: Any = np,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.momentum, self.eps = float(momentum), float(eps)
        self.xp = xp
        self.params["gamma"] = xp.ones(num_features, dtype=dtype)
        self.params["beta"] = xp.zeros(num_features, dtype=dtype)
        self.grads = {k: xp.zeros_like(v) for k, v in self.params.items()}
        self.stats["running_mean"] = xp.zeros(num_features, dtype=dtype)
        self.stats["running_var"] = xp.ones(num_features, dtype=dtype)

    def _layout(self, x: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if x.ndim == 2:
            axes, shape = (0,), (1, x.shape[1])
        elif x.ndim == 4:
            axes, shape = (0, 2, 3), (1, x.shape[1], 1, 1)
        else:
            raise ValueError(f"BatchNorm takes (N, F) or (N, C, H, W) input, got shape {x.shape}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchNorm has {self.num_features} features, input has {x.shape[1]}"
            )
        return axes, shape

    def forward(self, x: Any, train: bool = True) -> Any:
        xp = self.xp
        axes, shape = self._layout(x)
        self._axes, self._shape, self._train = axes, shape, train
        if train:
            m = x.size // x.shape[1]
            mean = x.mean(axis=axes)
            xhat = x - mean.reshape(shape)
            var = xp.mean(xhat * xhat, axis=axes)
            inv_std = 1.0 / xp.sqrt(var + self.eps)
            self._update_running(mean, var, m)
        else:
            inv_std = 1.0 / xp.sqrt(self.stats["running_var"] + self.eps)
            xhat = x - self.stats["running_mean"].reshape(shape)
        xhat *= inv_std.reshape(shape)
        self._xhat, self._inv_std = xhat, inv_std
        out = xhat * self.params["gamma"].reshape(shape)
        out += self.params["beta"].reshape(shape)
        return out

    def _update_running(self, mean: Any, var: Any, m: int) -> None:
        mom = self.momentum
        unbiased = var * (m / (m - 1)) if m > 1 else var
        rm, rv = self.stats["running_mean"], self.stats["running_var"]
        rm *= 1.0 - mom
        rm += mom * mean
        rv *= 1.0 - mom
        rv += mom * unbiased

    def backward(self, dout: Any, *, accumulate: bool = False, need_dx: bool = True) -> Any:
        axes, shape, xhat = self._axes, self._shape, self._xhat
        dbeta = dout.sum(axis=axes)
        dgamma = (dout * xhat).sum(axis=axes)
        self._set_grad("gamma", dgamma, accumulate)
        self._set_grad("beta", dbeta, accumulate)
        if not need_dx:
            return None
        scale = (self.params["gamma"] * self._inv_std).reshape(shape)
        if not self._train:  # the statistics were constants
            return dout * scale
        m = dout.size // dout.shape[1]
        # dx = gamma*inv_std/m * (m*dout - sum(dout) - xhat*sum(dout*xhat))
        dx = dout * m
        dx -= dbeta.reshape(shape)
        dx -= xhat * dgamma.reshape(shape)
        dx *= scale * (1.0 / m)
        return dx
