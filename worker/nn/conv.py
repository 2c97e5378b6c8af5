"""Convolution on NCHW arrays by im2col, with an optional fused 2x2 max pool.

Conv2D lays the patches of a chunk of images out as one (C*k*k + 1, P)
matrix whose last row is all ones, so that each pass is one large matmul and
the bias rides in it: forward [W | b] @ cols, the weight gradient
d2 @ cols.T gives dW and db together, and the input gradient is W.T @ d2
scattered back by col2im. The batch goes a chunk at a time and the chunks
are shared out over threads (worker/nn/chunks.py); backward rebuilds a
chunk's patches from the kept input rather than keep the batch's.

Three layouts of the P positions, one per case:

- `_Grid`, stride 1: each input channel is one flat row holding the chunk's
  images back to back, zero-padded, neighbouring images sharing their p
  border rows and neighbouring rows their p border columns (a row pitch of
  R = W + p). A kernel offset (i, j) is then the same shift i*R + j of the
  whole row: im2col is k*k contiguous copies and col2im k*k contiguous adds,
  with no loop over positions and no short strided runs. The matmuls also
  cover the border positions ((H+p)(W+p) per image instead of H*W: +7% at
  28x28, +15% at 14x14), whose outputs are thrown away and whose gradients
  are zero.
  With `pool=2`, each chunk's 2x2 windows are copied out of its output grid
  (still in cache) in window-major order and pooled there, so the
  full-size output is never written out (worker/nn/pool.py's kernels).
- `_Phases`, stride 1 with `pool=2` and narrow patches (see
  PHASES_MAX_PATCH_PER_OUTPUT): the same idea on the four polyphase
  components of the padded input (its even/odd rows and columns). Output
  pixel (2a+i, 2b+j) reads component ((i+u)%2, (j+v)%2) shifted by
  ((i+u)//2, (j+v)//2), so the matmul's positions come out phase by phase:
  the pool is an element-wise maximum of four contiguous blocks, with no
  window copied at all. Each image keeps its own borders here: the matmuls
  cover 4*ceil((H+2p)/2)*ceil((W+2p)/2) positions per image (+15% at 28x28,
  +31% at 14x14), and im2col is 4*k*k shorter copies.
- `_Strided`, any stride: patches copied from one strided view of the
  zero-bordered input, col2im a loop over the k*k offsets.
"""
from __future__ import annotations

from typing import Any

import numpy as np

import worker.nn.chunks as chunking
from worker.nn.chunks import Scratch, Scratches, zero
from worker.nn.init import init_weight
from worker.nn.layers import Layer
from worker.nn.pool import MaxPool2D, max_of_windows, shares_of_windows, window_view

__all__ = ["Conv2D", "MaxPool2D", "conv_output_size"]

# A pooled stride-1 convolution takes the polyphase layout when its patches
# are narrow next to its output: Cin*k*k <= PHASES_MAX_PATCH_PER_OUTPUT *
# Cout. Polyphase pools without copying windows out of the output, but pays
# 4 k*k shorter copies per chunk and more border positions. Measured on the
# bench CNN: conv 1->8 at 28x28 (9 <= 16) ran 1.15x faster than pooling
# from the flat grid, conv 8->16 at 14x14 (72 > 32) 1.3x slower.
PHASES_MAX_PATCH_PER_OUTPUT = 2


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of a convolution along one axis."""
    return (size + 2 * pad - kernel) // stride + 1


def _ones_last_row(array: Any) -> None:
    array[-1] = 1


class Conv2D(Layer):
    """2-D convolution (cross-correlation), NCHW, square kernel.

    W has shape (out_channels, in_channels, k, k), b (out_channels,).
    `padding` is "same" (odd kernel, stride 1: output size = input size) or
    an int of zeros on every side; `stride` is any int >= 1. `pool=2` (stride
    1 only) max-pools the output over 2x2 windows, exactly as a MaxPool2D(2)
    after this layer would, ties included, without writing the full-size
    output. Forward keeps a reference to its input for backward (as Dense
    does).
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
        pool: int | None = None,
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
        if pool not in (None, 2) or (pool and stride != 1):
            raise ValueError(f"Conv2D pool must be None or 2 (with stride 1), got pool "
                             f"{pool!r} with stride {stride}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel, self.stride, self.pad, self.pool = kernel, stride, padding, pool
        rng = np.random.default_rng(0) if rng is None else rng
        kk = kernel * kernel
        shape = (out_channels, in_channels, kernel, kernel)
        self.params["W"] = init_weight(
            init, shape, in_channels * kk, out_channels * kk, rng, xp=xp, dtype=dtype
        )
        self.params["b"] = xp.zeros(out_channels, dtype=dtype)
        self.grads = {k: xp.zeros_like(v) for k, v in self.params.items()}
        self.xp = xp
        self._scratch = Scratches()
        self._geo: _Grid | _Phases | _Strided | None = None
        self._x: Any = None
        self._wb: Any = None  # [W | b] as the last forward used it, (Cout, C*k*k + 1)
        self._masks: Any = None  # the fused pool's, from the last forward in train mode
        self._held: dict[int, tuple[int, int]] = {}  # slot -> images whose patches it holds

    def output_shape(self, in_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C, H, W) of one example in -> (Cout, Ho, Wo) out (pooled with `pool`)."""
        _, h, w = in_shape
        k, s, p = self.kernel, self.stride, self.pad
        ho, wo = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
        if self.pool:
            ho, wo = ho // self.pool, wo // self.pool
        return self.out_channels, ho, wo

    def macs(self) -> int:
        """Multiply-adds of one pass (forward, weight gradient or input gradient)
        over the last forward's batch: Cout * Cin*k*k * N*Ho*Wo (the layouts'
        border positions, computed and thrown away, not included)."""
        if self._x is None or self._geo is None:
            return 0
        per_image = self.out_channels * self._geo.kdim * self._geo.ho * self._geo.wo
        return per_image * int(self._x.shape[0])

    def forward(self, x: Any, train: bool = True) -> Any:
        xp = self.xp
        n, c, h, w = x.shape
        k, s, p = self.kernel, self.stride, self.pad
        if c != self.in_channels:
            raise ValueError(f"Conv2D expects {self.in_channels} input channels, got {c}")
        ho, wo = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
        if ho < 1 or wo < 1:
            raise ValueError(f"Conv2D input {h}x{w} is smaller than its {k}x{k} kernel")
        if self.pool and (ho < 2 or wo < 2):
            raise ValueError(f"Conv2D output {ho}x{wo} is smaller than its 2x2 pool")
        geo = self._geo
        if geo is None or geo.key != (c, h, w):
            if s != 1:
                geo = _Strided(c, h, w, k, s, p)
            elif self.pool and c * k * k <= PHASES_MAX_PATCH_PER_OUTPUT * self.out_channels:
                geo = _Phases(c, h, w, k, s, p)
            else:
                geo = _Grid(c, h, w, k, s, p, pool=bool(self.pool))
            self._geo = geo
        cout = self.out_channels
        wb = self._scratch(0, xp).get("wb", (cout, geo.kdim + 1), x.dtype)
        wb[:, :-1] = self.params["W"].reshape(cout, -1)
        wb[:, -1] = self.params["b"]
        out = xp.empty((n, cout, *geo.out_hw), dtype=x.dtype)
        masks = geo.new_masks(cout, n, xp) if self.pool and train else None
        runs = chunking.chunks(n, geo.bytes_per_image(x.itemsize), xp)
        self._held = {}

        def run(item: int, slot: int) -> None:
            n0, n1 = runs[item]
            scratch = self._scratch(slot, xp)
            cols = self._patches(x, n0, n1, slot)
            grid = scratch.get("out", (cout, cols.shape[1]), x.dtype)
            xp.matmul(wb, cols, out=grid)  # bias included, through the ones row
            geo.output(grid, n1 - n0, out[n0:n1], geo.masks_of(masks, n0, n1), scratch)

        chunking.run_chunks(len(runs), run, xp)
        self._x, self._wb, self._masks = x, wb, masks
        return out

    def backward(self, dout: Any, *, accumulate: bool = False, need_dx: bool = True) -> Any:
        xp, geo, x, wb = self.xp, self._geo, self._x, self._wb
        if x is None or geo is None:
            raise RuntimeError("Conv2D.backward needs a forward first")
        if self.pool and self._masks is None:
            raise RuntimeError("Conv2D(pool=2).backward needs a forward with train=True first")
        n, cout = x.shape[0], self.out_channels
        # Last chunk first: a thread's last forward chunk is still in its scratch.
        runs = chunking.chunks(n, geo.bytes_per_image(x.itemsize), xp)[::-1]
        # One [dW | db] per chunk, summed in a fixed order: the same bits
        # whichever thread ran which chunk.
        parts = self._scratch(0, xp).get("dwb", (len(runs), cout, geo.kdim + 1), dout.dtype)
        dx = xp.empty(x.shape, dtype=dout.dtype) if need_dx else None

        def run(item: int, slot: int) -> None:
            n0, n1 = runs[item]
            scratch = self._scratch(slot, xp)
            cols = self._patches(x, n0, n1, slot)
            d2 = geo.gradient(dout[n0:n1], n1 - n0, geo.masks_of(self._masks, n0, n1), scratch)
            xp.matmul(d2, cols.T, out=parts[item])  # the ones row sums d2: db
            if need_dx:
                self._held.pop(slot, None)
                dcols = cols[:-1]  # the patches are read for the last time above
                xp.matmul(wb[:, :-1].T, d2, out=dcols)
                geo.col2im(dcols, n1 - n0, scratch, dx[n0:n1])

        chunking.run_chunks(len(runs), run, xp)
        dwb = parts[0] if len(runs) == 1 else parts.sum(axis=0)
        dw, db = dwb[:, :-1].reshape(self.grads["W"].shape), dwb[:, -1]
        if accumulate:
            self.grads["W"] += dw
            self.grads["b"] += db
        else:
            self.grads["W"][...] = dw
            self.grads["b"][...] = db
        return dx

    def _patches(self, x: Any, n0: int, n1: int, slot: int) -> Any:
        """(C*k*k + 1, positions) patch matrix of images n0..n1-1, last row
        ones, in `slot`'s scratch (made unless it already holds them)."""
        geo, m = self._geo, n1 - n0
        cols = self._scratch(slot, self.xp).get(
            "cols", (geo.kdim + 1, m * geo.image_positions), x.dtype, _ones_last_row)
        if self._held.get(slot) != (n0, n1):
            geo.im2col(x[n0:n1], cols[:-1], self._scratch(slot, self.xp))
            self._held[slot] = (n0, n1)
        return cols


class _Layout:
    """What the layouts share: chunks sized by their patch matrix and, unless
    a layout pools, an output of every valid position."""

    ho: int
    wo: int
    kdim: int
    image_positions: int

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.ho, self.wo

    def bytes_per_image(self, itemsize: int) -> int:
        return (self.kdim + 1) * self.image_positions * itemsize

    def valid(self, grid: Any, m: int) -> Any:
        raise NotImplementedError

    def new_masks(self, cout: int, n: int, xp: Any) -> None:
        return None

    def masks_of(self, masks: Any, n0: int, n1: int) -> None:
        return None

    def output(self, grid: Any, m: int, out: Any, masks: Any, scratch: Scratch) -> None:
        out[...] = self.valid(grid, m).transpose(1, 0, 2, 3)

    def gradient_grid(self, cout: int, m: int, dtype: Any, scratch: Scratch) -> Any:
        """A (Cout, positions) gradient grid: zero where no caller writes."""
        return scratch.get("d2", (cout, m * self.image_positions), dtype, zero)

    def gradient(self, dout: Any, m: int, masks: Any, scratch: Scratch) -> Any:
        """The (Cout, positions) gradient grid of a chunk's (m, Cout, Ho, Wo)
        dout. Positions outside the valid outputs were zeroed when the grid
        was made and are never written: they get no gradient."""
        d2 = self.gradient_grid(dout.shape[1], m, dout.dtype, scratch)
        self.valid(d2, m)[...] = dout.transpose(1, 0, 2, 3)
        return d2


class _Grid(_Layout):
    """Stride 1: the flat grid of the module docstring, a chunk of m images.

    Image n's padded pixel (row r, column q), 0 <= r < H+2p, 0 <= q < W+2p,
    sits at n*rows*R + r*R + q of its channel's row, rows = H + p, R = W + p:
    pixels past W+p wrap into the next row's left border, rows past H+p into
    the next image's top border, both zero. Output (n, r, q) is at the same
    index, and reads the inputs at that index plus i*R + j. A zero tail past
    the last image stands for the next image's top border. (With p > k - 1
    rows and R grow by p - k + 1, so that outputs still fit in their image.)
    """

    def __init__(self, c: int, h: int, w: int, k: int, s: int, p: int, pool: bool = False) -> None:
        self.key = (c, h, w)
        self.c, self.h, self.w, self.k, self.p, self.pool = c, h, w, k, p, pool
        self.ho, self.wo = h + 2 * p - k + 1, w + 2 * p - k + 1
        extra = max(0, p - k + 1)
        self.pitch = w + p + extra
        self.rows = h + p + extra
        self.image_positions = self.rows * self.pitch
        self.tail = (k - 1) * (self.pitch + 1)  # what the last shifts read past the end
        self.kdim = c * k * k

    def valid(self, grid: Any, m: int) -> Any:
        """(C', m, Ho, Wo) view of the outputs in a (C', m * image_positions) grid."""
        g = grid.reshape(grid.shape[0], m, self.rows, self.pitch)
        return g[:, :, :self.ho, :self.wo]

    # With `pool`, the output is the 2x2 maxima of the valid outputs, each
    # chunk's windows copied out of its grid (in cache) in window-major order.

    @property
    def out_hw(self) -> tuple[int, int]:
        return (self.ho // 2, self.wo // 2) if self.pool else (self.ho, self.wo)

    def new_masks(self, cout: int, n: int, xp: Any) -> Any:
        return xp.empty((3, cout, n, *self.out_hw), dtype=bool) if self.pool else None

    def masks_of(self, masks: Any, n0: int, n1: int) -> Any:
        return None if masks is None else masks[:, :, n0:n1]

    def output(self, grid: Any, m: int, out: Any, masks: Any, scratch: Scratch) -> None:
        if not self.pool:
            return super().output(grid, m, out, masks, scratch)
        windows = window_view(self.valid(grid, m))
        q = scratch.get("windows", windows.shape, grid.dtype)
        q[...] = windows
        pooled = scratch.get("pooled", q.shape[2:], grid.dtype)
        max_of_windows(q.reshape(4, *q.shape[2:]), pooled, masks, scratch)
        out[...] = pooled.transpose(1, 0, 2, 3)

    def gradient(self, dout: Any, m: int, masks: Any, scratch: Scratch) -> Any:
        if not self.pool:
            return super().gradient(dout, m, masks, scratch)
        cout = dout.shape[1]
        g = scratch.get("shares", (2, 2, cout, m, *self.out_hw), dout.dtype)
        shares_of_windows(dout.transpose(1, 0, 2, 3), masks, g.reshape(4, *g.shape[2:]))
        # Only window positions are written: the rest stays zero, no gradient.
        d2 = self.gradient_grid(cout, m, dout.dtype, scratch)
        windows = window_view(self.valid(d2, m))
        for i in range(2):  # one (i, j) at a time: numpy writes a 6-d transpose slowly
            for j in range(2):
                windows[i, j] = g[i, j]
        return d2

    def _interior(self, flat: Any, m: int) -> Any:
        """(C, m, H, W) view of the image pixels in a (C, >= m * image_positions) row set."""
        g = flat[:, :m * self.image_positions].reshape(self.c, m, self.rows, self.pitch)
        p = self.p
        return g[:, :, p:p + self.h, p:p + self.w]

    def im2col(self, x: Any, cols: Any, scratch: Scratch) -> None:
        xp, k, pitch, m = scratch.xp, self.k, self.pitch, x.shape[0]
        size = m * self.image_positions
        flat = scratch.get("grid_in", (self.c, size + self.tail), x.dtype, zero)
        self._interior(flat, m)[...] = x.transpose(1, 0, 2, 3)  # borders, tail stay zero
        item = flat.itemsize
        # (C, k, k, positions): offset (i, j) is the row shifted by i*R + j.
        shifted = xp.lib.stride_tricks.as_strided(
            flat, (self.c, k, k, size), (flat.strides[0], pitch * item, item, item))
        cols.reshape(self.c, k, k, size)[...] = shifted

    def col2im(self, dcols: Any, m: int, scratch: Scratch, out: Any) -> None:
        """out (m, C, H, W) = the input gradient of the (C*k*k, positions)
        patch gradients. What a shift pushes past the chunk's end lands on
        borders only, and is left out."""
        k, pitch, size = self.k, self.pitch, m * self.image_positions
        dflat = scratch.get("grid_dx", (self.c, size), dcols.dtype)
        parts = dcols.reshape(self.c, k * k, size)
        dflat[...] = parts[:, 0]  # offset 0: a copy, so no zeroing first
        for t in range(1, k * k):
            shift = (t // k) * pitch + t % k
            if shift < size:
                dflat[:, shift:] += parts[:, t, :size - shift]
        out[...] = self._interior(dflat, m).transpose(1, 0, 2, 3)


class _Strided(_Layout):
    """Any stride: patches copied from one strided view of a (C, m, H+2p,
    W+2p) zero-bordered copy of the input chunk, in (C, k, k, m, Ho, Wo) order."""

    def __init__(self, c: int, h: int, w: int, k: int, s: int, p: int) -> None:
        self.key = (c, h, w)
        self.c, self.h, self.w, self.k, self.s, self.p = c, h, w, k, s, p
        self.ho, self.wo = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
        self.image_positions = self.ho * self.wo
        self.kdim = c * k * k

    def valid(self, grid: Any, m: int) -> Any:
        return grid.reshape(grid.shape[0], m, self.ho, self.wo)

    def im2col(self, x: Any, cols: Any, scratch: Scratch) -> None:
        c, h, w, k, s, p = self.c, self.h, self.w, self.k, self.s, self.p
        m = x.shape[0]
        shape = (c, m, h + 2 * p, w + 2 * p)
        padded = scratch.get("padded", shape, x.dtype, zero)  # the border stays zero
        padded[:, :, p:p + h, p:p + w] = x.transpose(1, 0, 2, 3)
        sc, sn, sh, sw = padded.strides
        patches = scratch.xp.lib.stride_tricks.as_strided(
            padded, (c, k, k, m, self.ho, self.wo), (sc, sh, sw, sn, s * sh, s * sw))
        cols.reshape(c, k, k, m, self.ho, self.wo)[...] = patches

    def col2im(self, dcols: Any, m: int, scratch: Scratch, out: Any) -> None:
        c, h, w, k, s, p = self.c, self.h, self.w, self.k, self.s, self.p
        ho, wo = self.ho, self.wo
        dpad = scratch.get("dpadded", (c, m, h + 2 * p, w + 2 * p), dcols.dtype)
        dpad.fill(0)
        parts = dcols.reshape(c, k, k, m, ho, wo)
        for i in range(k):
            for j in range(k):
                dpad[:, :, i:i + s * ho:s, j:j + s * wo:s] += parts[:, i, j]
        out[...] = dpad[:, :, p:p + h, p:p + w].transpose(1, 0, 2, 3)


class _Phases(_Layout):
    """Stride 1 and a 2x2 max pool: the polyphase layout of the module docstring.

    Component (s, t) of image n holds padded pixel (2a+s, 2b+t) at
    n*rows*R + a*R + b of its channel's row, rows = ceil((H+2p)/2),
    R = ceil((W+2p)/2); the four components are four such row sets. The
    positions of the patch matrix are four blocks, output phase (i, j) =
    2i + j, each indexed like a component: phase (i, j) at (n, a, b) is
    output pixel (2a+i, 2b+j), and the pool's window (a, b) is the four
    blocks' entries at (n, a, b).
    """

    def __init__(self, c: int, h: int, w: int, k: int, s: int, p: int) -> None:
        self.key = (c, h, w)
        self.c, self.h, self.w, self.k, self.p = c, h, w, k, p
        self.ho, self.wo = h + 2 * p - k + 1, w + 2 * p - k + 1
        self.rows, self.pitch = (h + 2 * p + 1) // 2, (w + 2 * p + 1) // 2
        self.plane = self.rows * self.pitch
        self.image_positions = 4 * self.plane
        self.tail = (k // 2) * (self.pitch + 1)  # the largest shift
        self.kdim = c * k * k

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.ho // 2, self.wo // 2

    def new_masks(self, cout: int, n: int, xp: Any) -> Any:
        return xp.empty((3, cout, n * self.plane), dtype=bool)

    def masks_of(self, masks: Any, n0: int, n1: int) -> Any:
        return None if masks is None else masks[:, :, n0 * self.plane:n1 * self.plane]

    def _pixels(self, planes: Any, s: int, t: int, m: int) -> tuple[Any, tuple[slice, slice]]:
        """(C, m, ., .) view of component (s, t)'s input pixels in `planes`,
        and the (rows, columns) of the input they are."""
        p = self.p
        a0, b0 = (p - s + 1) // 2, (p - t + 1) // 2  # first row / column holding a pixel
        y0, x0 = 2 * a0 + s - p, 2 * b0 + t - p  # ... and which input row / column it is
        ny, nx = len(range(y0, self.h, 2)), len(range(x0, self.w, 2))
        g = planes[s, t, :, :m * self.plane].reshape(self.c, m, self.rows, self.pitch)
        return g[:, :, a0:a0 + ny, b0:b0 + nx], (slice(y0, None, 2), slice(x0, None, 2))

    def _shifts(self) -> list[tuple[int, int, int, int, int, int]]:
        """(phase, u, v, s, t, shift): block `phase`'s rows for kernel offset
        (u, v) are component (s, t) shifted by `shift`."""
        k, pitch = self.k, self.pitch
        return [(2 * i + j, u, v, (i + u) % 2, (j + v) % 2, (i + u) // 2 * pitch + (j + v) // 2)
                for i in range(2) for j in range(2) for u in range(k) for v in range(k)]

    def im2col(self, x: Any, cols: Any, scratch: Scratch) -> None:
        m, size = x.shape[0], x.shape[0] * self.plane
        planes = scratch.get("planes", (2, 2, self.c, size + self.tail), x.dtype, zero)
        for s in range(2):
            for t in range(2):
                pixels, (rows, columns) = self._pixels(planes, s, t, m)
                pixels[...] = x[:, :, rows, columns].transpose(1, 0, 2, 3)  # borders stay zero
        blocks = cols.reshape(self.c, self.k, self.k, 4, size)
        for phase, u, v, s, t, shift in self._shifts():
            blocks[:, u, v, phase] = planes[s, t, :, shift:shift + size]

    def col2im(self, dcols: Any, m: int, scratch: Scratch, out: Any) -> None:
        size = m * self.plane
        dplanes = scratch.get("dplanes", (2, 2, self.c, size + self.tail), dcols.dtype)
        dplanes.fill(0)
        blocks = dcols.reshape(self.c, self.k, self.k, 4, size)
        for phase, u, v, s, t, shift in self._shifts():
            dplanes[s, t, :, shift:shift + size] += blocks[:, u, v, phase]
        for s in range(2):
            for t in range(2):
                pixels, (rows, columns) = self._pixels(dplanes, s, t, m)
                out[:, :, rows, columns] = pixels.transpose(1, 0, 2, 3)

    def _pooled(self, grid: Any, m: int) -> Any:
        """(C', m, Ho/2, Wo/2) view of the windows in a (C', m * plane) grid."""
        g = grid.reshape(grid.shape[0], m, self.rows, self.pitch)
        return g[:, :, :self.out_hw[0], :self.out_hw[1]]

    def output(self, grid: Any, m: int, out: Any, masks: Any, scratch: Scratch) -> None:
        cout, size = grid.shape[0], m * self.plane
        pooled = scratch.get("pooled", (cout, size), grid.dtype)
        # Phases (0,0), (0,1), (1,0), (1,1): a window's elements in row-major order.
        max_of_windows(grid.reshape(cout, 4, size).transpose(1, 0, 2), pooled, masks, scratch)
        out[...] = self._pooled(pooled, m).transpose(1, 0, 2, 3)

    def gradient(self, dout: Any, m: int, masks: Any, scratch: Scratch) -> Any:
        """The (Cout, 4 * plane * m) gradient grid of a chunk's pooled dout.
        The positions of no window are zeroed when `gp` is made and never
        written, so all four phases get no gradient there."""
        cout, size = dout.shape[1], m * self.plane
        gp = scratch.get("gp", (cout, size), dout.dtype, zero)
        self._pooled(gp, m)[...] = dout.transpose(1, 0, 2, 3)
        d2 = scratch.get("d2", (cout, 4 * size), dout.dtype)
        shares_of_windows(gp, masks, d2.reshape(cout, 4, size).transpose(1, 0, 2))
        return d2
