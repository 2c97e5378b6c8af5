"""Convolution and max pooling on NCHW arrays, by im2col and strided slices.

Conv2D lays the patches of the whole batch out as one (C*k*k, N*Ho*Wo)
matrix, so forward, dW and dcols are each one large matmul (faster on both
BLAS and cuBLAS than N small ones); the price is one transposed copy to and
from the (C, N, H, W) order per pass. im2col and col2im are k*k strided
slice copies / adds, with no scatter-add (which cupy and numpy treat
differently).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from worker.nn.init import init_weight
from worker.nn.layers import Layer, xp_of


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of a convolution along one axis."""
    return (size + 2 * pad - kernel) // stride + 1


class Conv2D(Layer):
    """2-D convolution (cross-correlation), NCHW, square kernel.

    W has shape (out_channels, in_channels, k, k), b (out_channels,).
    `padding` is "same" (odd kernel, stride 1: output size = input size) or
    an int of zeros on every side; `stride` is any int >= 1.
    """

    kind = "conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        *,
        stride: int = 1,
        padding: int | str = "same",
        init: str = "he",
        rng: np.random.Generator | None = None,
        xp: Any = np,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        if kernel < 1 or stride < 1:
            raise ValueError(f"Conv2D needs kernel >= 1 and stride >= 1, got {kernel}, {stride}")
        if padding == "same":
            if kernel % 2 == 0 or stride != 1:
                raise ValueError(
                    f"Conv2D 'same' padding needs an odd kernel and stride 1, "
                    f"got kernel {kernel}, stride {stride}"
                )
            padding = kernel // 2
        if not isinstance(padding, int) or padding < 0:
            raise ValueError(f"Conv2D padding must be 'same' or an int >= 0, got {padding!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel, self.stride, self.pad = kernel, stride, padding
        rng = np.random.default_rng(0) if rng is None else rng
        kk = kernel * kernel
        shape = (out_channels, in_channels, kernel, kernel)
        self.params["W"] = init_weight(
            init, shape, in_channels * kk, out_channels * kk, rng, xp=xp, dtype=dtype
        )
        self.params["b"] = xp.zeros(out_channels, dtype=dtype)
        self.grads = {k: xp.zeros_like(v) for k, v in self.params.items()}
        self.xp = xp

    def output_shape(self, in_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) of one example in -> (Cout, Ho, Wo) out."""
        _, h, w = in_shape
        k, s, p = self.kernel, self.stride, self.pad
        return self.out_channels, conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)

    def forward(self, x: Any, train: bool = True) -> Any:
        xp = self.xp
        n, c, h, w = x.shape
        k, s, p = self.kernel, self.stride, self.pad
        ho, wo = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
        if ho < 1 or wo < 1:
            raise ValueError(f"Conv2D input {h}x{w} is smaller than its {k}x{k} kernel")
        self._in_shape = x.shape
        xc = x.transpose(1, 0, 2, 3)  # (C, N, H, W): patches come out as plain slices
        if k == 1 and s == 1 and p == 0:
            cols = xp.ascontiguousarray(xc).reshape(c, n * h * w)
        else:
            if p:
                xpad = self._padded(xc.shape, x.dtype)
                xpad[:, :, p:p + h, p:p + w] = xc
            else:
                xpad = xc
            cols = xp.empty((c, k, k, n, ho, wo), dtype=x.dtype)
            for i in range(k):
                for j in range(k):
                    cols[:, i, j] = xpad[:, :, i:i + s * ho:s, j:j + s * wo:s]
            cols = cols.reshape(c * k * k, n * ho * wo)
        self._cols = cols
        # One large matmul over every position of every example.
        out = xp.matmul(self.params["W"].reshape(self.out_channels, -1), cols)
        out += self.params["b"][:, None]
        out = out.reshape(self.out_channels, n, ho, wo).transpose(1, 0, 2, 3)
        return xp.ascontiguousarray(out)

    def _padded(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A zero-bordered (C, N, H+2p, W+2p) buffer, kept between calls: only
        its interior is ever written, so the border stays zero."""
        p = self.pad
        full = (shape[0], shape[1], shape[2] + 2 * p, shape[3] + 2 * p)
        buf = getattr(self, "_pad_buf", None)
        if buf is None or buf.shape != full or buf.dtype != dtype:
            buf = self._pad_buf = self.xp.zeros(full, dtype=dtype)
        return buf

    def backward(self, dout: Any, *, accumulate: bool = False, need_dx: bool = True) -> Any:
        xp, cols = self.xp, self._cols
        n, c, h, w = self._in_shape
        k, s, p = self.kernel, self.stride, self.pad
        ho, wo = dout.shape[2], dout.shape[3]
        cout = self.out_channels
        d2 = xp.ascontiguousarray(dout.transpose(1, 0, 2, 3)).reshape(cout, n * ho * wo)
        if accumulate:
            self.grads["W"] += xp.matmul(d2, cols.T).reshape(self.grads["W"].shape)
            self.grads["b"] += d2.sum(axis=1)
        else:
            xp.matmul(d2, cols.T, out=self.grads["W"].reshape(cout, -1))
            xp.sum(d2, axis=1, out=self.grads["b"])
        if not need_dx:
            return None
        dcols = xp.matmul(self.params["W"].reshape(cout, -1).T, d2)  # (C*k*k, N*Ho*Wo)
        if k == 1 and s == 1 and p == 0:
            dxc = dcols.reshape(c, n, h, w)
        else:
            dcols = dcols.reshape(c, k, k, n, ho, wo)
            dxc = xp.zeros((c, n, h + 2 * p, w + 2 * p), dtype=dout.dtype)
            for i in range(k):
                for j in range(k):
                    dxc[:, :, i:i + s * ho:s, j:j + s * wo:s] += dcols[:, i, j]
            dxc = dxc[:, :, p:p + h, p:p + w]
        return xp.ascontiguousarray(dxc.transpose(1, 0, 2, 3))


class MaxPool2D(Layer):
    """k x k max pooling with stride k on NCHW; rows/columns that do not fill
    a whole window are dropped (floor mode). A tie sends the gradient to the
    first maximum in row-major window order, as PyTorch does."""

    kind = "pool"

    def __init__(self, kernel: int = 2) -> None:
        super().__init__()
        if kernel < 1:
            raise ValueError(f"MaxPool2D kernel must be >= 1, got {kernel}")
        self.kernel = kernel

    def output_shape(self, in_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = in_shape
        return c, h // self.kernel, w // self.kernel

    def forward(self, x: Any, train: bool = True) -> Any:
        k = self.kernel
        h, w = x.shape[2], x.shape[3]
        ho, wo = h // k, w // k
        if ho < 1 or wo < 1:
            raise ValueError(f"MaxPool2D input {h}x{w} is smaller than its {k}x{k} window")
        xp = xp_of(x)
        self._in_shape = x.shape
        out = x[:, :, 0:ho * k:k, 0:wo * k:k].copy()
        # Window position of the maximum, 0..k*k-1 row-major; only a strictly
        # greater value moves it, so a tie keeps the first.
        idx = xp.zeros(out.shape, dtype=xp.int8 if k * k < 128 else xp.int32) if train else None
        for t in range(1, k * k):
            i, j = divmod(t, k)
            window = x[:, :, i:ho * k:k, j:wo * k:k]
            if train:
                # idx = t where window > out: every earlier index is < t, so
                # a maximum does it with fast integer ops (masked copies are slow).
                hit = window > out
                hit = hit.view(idx.dtype) if idx.dtype.itemsize == 1 else hit.astype(idx.dtype)
                hit *= t
                xp.maximum(idx, hit, out=idx)
            xp.maximum(out, window, out=out)
        self._idx = idx
        return out

    def backward(self, dout: Any, *, accumulate: bool = False, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        if self._idx is None:
            raise RuntimeError("MaxPool2D.backward needs a forward with train=True first")
        k, idx = self.kernel, self._idx
        xp = xp_of(dout)
        h, w = self._in_shape[2], self._in_shape[3]
        ho, wo = idx.shape[2], idx.shape[3]
        cropped = h != ho * k or w != wo * k
        dx = (xp.zeros if cropped else xp.empty)(self._in_shape, dtype=dout.dtype)
        for t in range(k * k):
            i, j = divmod(t, k)
            xp.multiply(dout, idx == t, out=dx[:, :, i:ho * k:k, j:wo * k:k])
        return dx
