"""Max pooling on NCHW arrays.

2x2 windows (build_model's, after BatchNorm) are copied, a chunk of images
at a time, into window-element-major order, (2, 2, m, C, Ho, Wo): the
maxima, which side won, and backward's shares are then contiguous
element-wise operations, with no short strided runs and no loop over
positions. Other window sizes loop over the k*k window offsets. Conv2D(pool=2) uses the same
kernels on each chunk of its output while it is still in cache, so the
full-size output is never written (worker/nn/conv.py).
"""
from __future__ import annotations

from typing import Any

import worker.nn.chunks as chunking
from worker.nn.chunks import Scratches
from worker.nn.layers import Layer, xp_of


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
        self._in_shape: tuple[int, ...] = ()
        self._masks: Any = None
        self._scratch = Scratches()

    def output_shape(self, in_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = in_shape
        return c, h // self.kernel, w // self.kernel

    def forward(self, x: Any, train: bool = True) -> Any:
        k = self.kernel
        h, w = x.shape[2], x.shape[3]
        ho, wo = h // k, w // k
        if ho < 1 or wo < 1:
            raise ValueError(f"MaxPool2D input {h}x{w} is smaller than its {k}x{k} window")
        self._in_shape = x.shape
        if k == 2:
            out, self._masks = self._forward2(x, train)
        else:
            out, self._masks = _forward_k(x, k, train)
        return out

    def backward(self, dout: Any, *, accumulate: bool = False, need_dx: bool = True) -> Any:
        if not need_dx:
            return None
        if self._masks is None:
            raise RuntimeError("MaxPool2D.backward needs a forward with train=True first")
        if self.kernel == 2:
            return self._backward2(dout)
        return _backward_k(dout, self._masks, self.kernel, self._in_shape)

    def _forward2(self, x: Any, train: bool) -> tuple[Any, Any]:
        xp = xp_of(x)
        n, c = x.shape[:2]
        ho, wo = x.shape[2] // 2, x.shape[3] // 2
        out = xp.empty((n, c, ho, wo), dtype=x.dtype)
        masks = tuple(xp.empty(out.shape, dtype=bool) for _ in range(3)) if train else None
        windows = window_view(x)
        runs = chunking.chunks(n, 4 * c * ho * wo * x.itemsize, xp)

        def run(item: int, slot: int) -> None:
            n0, n1 = runs[item]
            scratch = self._scratch(slot, xp)
            q = scratch.get("windows", (2, 2, n1 - n0, c, ho, wo), x.dtype)
            q[...] = windows[:, :, n0:n1]
            chunk_masks = None if masks is None else [mask[n0:n1] for mask in masks]
            max_of_windows(q.reshape(4, -1, c, ho, wo), out[n0:n1], chunk_masks, scratch)

        chunking.run_chunks(len(runs), run, xp)
        return out, masks

    def _backward2(self, dout: Any) -> Any:
        xp = xp_of(dout)
        n, c, h, w = self._in_shape
        ho, wo = h // 2, w // 2
        cropped = h != 2 * ho or w != 2 * wo
        dx = (xp.zeros if cropped else xp.empty)(self._in_shape, dtype=dout.dtype)
        windows = window_view(dx)
        runs = chunking.chunks(n, 4 * c * ho * wo * dout.itemsize, xp)

        def run(item: int, slot: int) -> None:
            n0, n1 = runs[item]
            g = self._scratch(slot, xp).get("grads", (2, 2, n1 - n0, c, ho, wo), dout.dtype)
            shares_of_windows(dout[n0:n1], [mask[n0:n1] for mask in self._masks],
                              g.reshape(4, -1, c, ho, wo))
            for i in range(2):  # one (i, j) at a time: numpy writes a 6-d transpose slowly
                for j in range(2):
                    windows[i, j, n0:n1] = g[i, j]

        chunking.run_chunks(len(runs), run, xp)
        return dx


def window_view(x: Any) -> Any:
    """(2, 2, N, C, Ho, Wo) view of the 2x2 windows of the last two axes of a
    4-d x (N, C, H, W): [i, j] is each window's element in row i, column j."""
    n, c, h, w = x.shape
    ho, wo = h // 2, w // 2
    six = x[:, :, :2 * ho, :2 * wo].reshape(n, c, ho, 2, wo, 2)
    return six.transpose(3, 5, 0, 1, 2, 4)


def max_of_windows(q: Any, out: Any, masks: Any, scratch: Any) -> None:
    """Maxima of 2x2 windows given as q[t] = element t of every window, t =
    top-left, top-right, bottom-left, bottom-right; q[0] is overwritten.
    masks, if given, get (top-right won its row, bottom-right won its row,
    the bottom row won): strict comparisons, so a tie keeps the left / top
    element and the first maximum in row-major order wins."""
    xp = xp_of(q)
    top = scratch.get("top", q.shape[1:], q.dtype)
    xp.maximum(q[0], q[1], out=top)
    if masks is not None:
        xp.greater(q[1], q[0], out=masks[0])
        xp.greater(q[3], q[2], out=masks[1])
    bottom = q[0]  # the top-left element is no longer needed
    xp.maximum(q[2], q[3], out=bottom)
    if masks is not None:
        xp.greater(bottom, top, out=masks[2])
    xp.maximum(top, bottom, out=out)


def shares_of_windows(dout: Any, masks: Any, g: Any) -> None:
    """Backward of max_of_windows: g[t] = the gradient of element t. dout goes
    to the winning row, then to its winning element; each loser's share is
    (share - winner's share), exact since the winner's is share * 1 or * 0."""
    xp = xp_of(dout)
    right_top, right_bottom, bottom = masks
    xp.multiply(dout, bottom, out=g[2])  # the bottom row's share
    xp.subtract(dout, g[2], out=g[0])  # the top row's
    xp.multiply(g[0], right_top, out=g[1])
    xp.subtract(g[0], g[1], out=g[0])
    xp.multiply(g[2], right_bottom, out=g[3])
    xp.subtract(g[2], g[3], out=g[2])


def _forward_k(x: Any, k: int, train: bool) -> tuple[Any, Any]:
    """k x k max pooling by a loop over the k*k window offsets; the mask is the
    window position (0..k*k-1, row-major) of the first maximum."""
    xp = xp_of(x)
    ho, wo = x.shape[2] // k, x.shape[3] // k
    out = x[:, :, 0:ho * k:k, 0:wo * k:k].copy()
    idx = xp.zeros(out.shape, dtype=xp.int8 if k * k < 128 else xp.int32) if train else None
    for t in range(1, k * k):
        i, j = divmod(t, k)
        window = x[:, :, i:ho * k:k, j:wo * k:k]
        if train:
            # idx = t where window > out: every earlier index is < t, so a
            # maximum does it with fast integer ops (masked copies are slow).
            hit = window > out
            hit = hit.view(idx.dtype) if idx.dtype.itemsize == 1 else hit.astype(idx.dtype)
            hit *= t
            xp.maximum(idx, hit, out=idx)
        xp.maximum(out, window, out=out)
    return out, idx


def _backward_k(dout: Any, idx: Any, k: int, in_shape: tuple[int, ...]) -> Any:
    xp = xp_of(dout)
    h, w = in_shape[2], in_shape[3]
    ho, wo = idx.shape[2], idx.shape[3]
    cropped = h != ho * k or w != wo * k
    dx = (xp.zeros if cropped else xp.empty)(in_shape, dtype=dout.dtype)
    for t in range(k * k):
        i, j = divmod(t, k)
        xp.multiply(dout, idx == t, out=dx[:, :, i:ho * k:k, j:wo * k:k])
    return dx
