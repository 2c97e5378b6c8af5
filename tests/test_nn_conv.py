"""Conv2D and MaxPool2D against straightforward loop implementations.

The layers take fast paths (a flat-grid im2col for stride 1, a strided one
otherwise, batches cut into chunks, chunks spread over threads, 2x2 pooling
in window-major order); each test here runs them against a reference that
loops over output positions, in float64, on small random shapes. The
gradient checks against finite differences are in test_nn_gradcheck.py.
"""
from __future__ import annotations

import numpy as np
import pytest

import worker.nn.chunks as chunks_module
import worker.nn.conv as conv_module
from worker.nn import Conv2D, LeakyReLU, MaxPool2D, ReLU, Sigmoid, Tanh, build_model
from worker.nn.conv import conv_output_size

F64 = np.float64


def naive_conv(x, w, b, stride, pad):
    """Forward of a cross-correlation by a loop over output positions."""
    n, _, h, wd = x.shape
    cout, _, k, _ = w.shape
    ho, wo = conv_output_size(h, k, stride, pad), conv_output_size(wd, k, stride, pad)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    y = np.empty((n, cout, ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
            y[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3])) + b
    return y


def naive_conv_backward(x, w, dout, stride, pad):
    """(dx, dW, db) of naive_conv, by the same loop."""
    _, _, h, wd = x.shape
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for i in range(dout.shape[2]):
        for j in range(dout.shape[3]):
            rows, cols = slice(i * stride, i * stride + k), slice(j * stride, j * stride + k)
            g = dout[:, :, i, j]  # (n, cout)
            dw += np.tensordot(g, xp[:, :, rows, cols], axes=([0], [0]))
            dxp[:, :, rows, cols] += np.tensordot(g, w, axes=([1], [0]))
    return dxp[:, :, pad:pad + h, pad:pad + wd], dw, dout.sum(axis=(0, 2, 3))


def naive_maxpool(x, k):
    """(out, dx for dout) of k x k max pooling; ties to the first maximum."""
    n, c, h, w = x.shape
    ho, wo = h // k, w // k
    out = np.empty((n, c, ho, wo))
    first = np.empty((n, c, ho, wo, 2), int)
    for i in range(ho):
        for j in range(wo):
            window = x[:, :, i * k:i * k + k, j * k:j * k + k].reshape(n, c, k * k)
            t = window.argmax(axis=2)  # the first maximum in row-major order
            out[:, :, i, j] = window.max(axis=2)
            first[:, :, i, j, 0], first[:, :, i, j, 1] = i * k + t // k, j * k + t % k

    def backward(dout):
        dx = np.zeros_like(x)
        nn, cc, ii, jj = np.indices(dout.shape)
        dx[nn, cc, first[..., 0], first[..., 1]] = dout
        return dx

    return out, backward


def with_ties(rng, shape):
    """Values on a coarse grid, so that windows hold equal maxima."""
    return rng.integers(-3, 4, size=shape).astype(F64)


CONV_CASES = [  # (batch, cin, cout, size, kernel, stride, padding)
    (3, 2, 3, 7, 3, 1, "same"),
    (2, 1, 4, 6, 3, 1, 0),
    (2, 3, 2, 5, 5, 1, 2),
    (2, 2, 2, 4, 1, 1, 0),
    (2, 2, 3, 5, 3, 1, 3),   # padding wider than k - 1
    (2, 2, 2, 4, 1, 1, 2),
    (3, 2, 3, 7, 3, 2, 1),
    (2, 3, 2, 8, 3, 3, 0),
    (2, 2, 2, 6, 2, 2, 1),
    (1, 1, 1, 3, 3, 1, 0),   # a 1x1 output
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "n{}c{}o{}s{}k{}st{}p{}".format(*c))
@pytest.mark.parametrize("chunk_bytes", [2 << 20, 1], ids=["one-chunk", "chunk-per-image"])
def test_conv_matches_the_loop(case, chunk_bytes, monkeypatch):
    monkeypatch.setattr(chunks_module, "CHUNK_BYTES", chunk_bytes)
    n, cin, cout, size, k, stride, padding = case
    rng = np.random.default_rng(sum(case[:6]))
    layer = Conv2D(cin, cout, k, stride=stride, padding=padding, rng=rng, dtype=F64)
    layer.params["b"][...] = rng.standard_normal(cout)
    pad = k // 2 if padding == "same" else padding
    x = rng.standard_normal((n, cin, size, size + 1))
    layer.forward(rng.standard_normal(x.shape))  # stale patches must not leak into the next pass
    y = layer.forward(x)
    w, b = layer.params["W"], layer.params["b"]
    np.testing.assert_allclose(y, naive_conv(x, w, b, stride, pad), rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(y.shape)
    dx = layer.backward(dout.copy())
    ref_dx, ref_dw, ref_db = naive_conv_backward(x, w, dout, stride, pad)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads["W"], ref_dw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads["b"], ref_db, rtol=1e-12, atol=1e-12)


POOLED_CASES = [  # (batch, cin, cout, height, width, kernel, padding) of Conv2D(pool=2)
    (3, 2, 3, 8, 8, 3, "same"),
    (2, 1, 4, 7, 9, 3, "same"),  # odd sizes: the last output row / column is not pooled
    (2, 3, 2, 6, 5, 5, 2),
    (2, 2, 3, 6, 7, 3, 0),
    (2, 2, 2, 4, 5, 1, 0),
    (2, 2, 2, 4, 4, 3, 3),       # padding wider than k - 1
    (2, 2, 2, 2, 3, 1, 1),
]


@pytest.mark.parametrize("case", POOLED_CASES, ids=lambda c: "n{}c{}o{}h{}w{}k{}p{}".format(*c))
@pytest.mark.parametrize("chunk_bytes", [2 << 20, 1], ids=["one-chunk", "chunk-per-image"])
@pytest.mark.parametrize("phases", [0, 10**6], ids=["grid", "phases"])
def test_pooled_conv_matches_the_loops(case, chunk_bytes, phases, monkeypatch):
    monkeypatch.setattr(chunks_module, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(conv_module, "PHASES_MAX_PATCH_PER_OUTPUT", phases)
    n, cin, cout, h, w, k, padding = case
    rng = np.random.default_rng(sum(case[:6]))
    layer = Conv2D(cin, cout, k, padding=padding, pool=2, rng=rng, dtype=F64)
    layer.params["b"][...] = rng.standard_normal(cout)
    pad = k // 2 if padding == "same" else padding
    x = with_ties(rng, (n, cin, h, w)) / 4  # ties inside the pooling windows too
    layer.forward(rng.standard_normal(x.shape))
    y = layer.forward(x)
    conv = naive_conv(x, layer.params["W"], layer.params["b"], 1, pad)
    ref_y, ref_pool_backward = naive_maxpool(conv, 2)
    assert y.shape == (n, *layer.output_shape((cin, h, w))) == ref_y.shape
    np.testing.assert_allclose(y, ref_y, rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(y.shape)
    dx = layer.backward(dout.copy())
    ref_dx, ref_dw, ref_db = naive_conv_backward(x, layer.params["W"], ref_pool_backward(dout), 1, pad)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads["W"], ref_dw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads["b"], ref_db, rtol=1e-12, atol=1e-12)


def test_pooled_conv_errors():
    with pytest.raises(ValueError, match="pool must be None or 2"):
        Conv2D(1, 1, 3, pool=3)
    with pytest.raises(ValueError, match="with stride 2"):
        Conv2D(1, 1, 3, stride=2, padding=1, pool=2)
    layer = Conv2D(1, 2, 3, pool=2)
    with pytest.raises(ValueError, match="smaller than its 2x2 pool"):
        layer.forward(np.zeros((1, 1, 1, 4), np.float32))
    layer.forward(np.zeros((1, 1, 4, 4), np.float32), train=False)
    with pytest.raises(RuntimeError, match="train=True"):
        layer.backward(np.zeros((1, 2, 2, 2), np.float32))


def test_conv_accumulates_and_skips_dx(monkeypatch):
    monkeypatch.setattr(chunks_module, "CHUNK_BYTES", 1)
    rng = np.random.default_rng(1)
    layer = Conv2D(2, 3, 3, rng=rng, dtype=F64)
    x1, x2 = rng.standard_normal((3, 2, 5, 5)), rng.standard_normal((2, 2, 5, 5))
    d1, d2 = rng.standard_normal((3, 3, 5, 5)), rng.standard_normal((2, 3, 5, 5))
    layer.forward(x1)
    assert layer.backward(d1, need_dx=False) is None
    layer.forward(x2)
    layer.backward(d2, accumulate=True)
    w = layer.params["W"]
    _, dw1, db1 = naive_conv_backward(x1, w, d1, 1, 1)
    _, dw2, db2 = naive_conv_backward(x2, w, d2, 1, 1)
    np.testing.assert_allclose(layer.grads["W"], dw1 + dw2, rtol=1e-12)
    np.testing.assert_allclose(layer.grads["b"], db1 + db2, rtol=1e-12)


def test_conv_float32_matches_float64():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 9, 9))
    layers = {dt: Conv2D(3, 5, 3, rng=np.random.default_rng(0), dtype=dt) for dt in (F64, np.float32)}
    ys = {dt: layer.forward(x.astype(dt)) for dt, layer in layers.items()}
    assert ys[np.float32].dtype == np.float32
    np.testing.assert_allclose(ys[np.float32], ys[F64], rtol=1e-5, atol=1e-5)
    dout = rng.standard_normal(ys[F64].shape)
    dxs = {dt: layer.backward(dout.astype(dt)) for dt, layer in layers.items()}
    np.testing.assert_allclose(dxs[np.float32], dxs[F64], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layers[np.float32].grads["W"], layers[F64].grads["W"],
                               rtol=1e-4, atol=1e-4)


def test_conv_errors():
    layer = Conv2D(2, 3, 3, padding=0)
    with pytest.raises(RuntimeError, match="forward first"):
        layer.backward(np.zeros((1, 3, 1, 1), np.float32))
    with pytest.raises(ValueError, match="smaller than its 3x3 kernel"):
        layer.forward(np.zeros((1, 2, 2, 5), np.float32))
    with pytest.raises(ValueError, match="expects 2 input channels"):
        layer.forward(np.zeros((1, 4, 5, 5), np.float32))


POOL_CASES = [  # (k, shape): odd sizes drop their last row / column
    (2, (2, 3, 4, 6)), (2, (2, 2, 5, 7)), (2, (1, 1, 2, 2)), (2, (3, 2, 3, 3)),
    (3, (2, 3, 4, 6)), (3, (2, 2, 7, 8)), (1, (2, 2, 3, 3)),
]


@pytest.mark.parametrize("k,shape", POOL_CASES)
@pytest.mark.parametrize("chunk_bytes", [2 << 20, 1], ids=["one-chunk", "chunk-per-image"])
def test_maxpool_matches_the_loop(k, shape, chunk_bytes, monkeypatch):
    monkeypatch.setattr(chunks_module, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(3)
    layer = MaxPool2D(k)
    for x in (with_ties(rng, shape), rng.standard_normal(shape)):
        out = layer.forward(x)
        ref_out, ref_backward = naive_maxpool(x, k)
        np.testing.assert_array_equal(out, ref_out)
        dout = rng.standard_normal(out.shape)
        np.testing.assert_array_equal(layer.backward(dout), ref_backward(dout))


def test_maxpool_eval_keeps_no_masks():
    layer = MaxPool2D(2)
    layer.forward(np.ones((1, 1, 2, 2)), train=False)
    with pytest.raises(RuntimeError, match="train=True"):
        layer.backward(np.ones((1, 1, 1, 1)))


def test_threads_give_the_same_bits(monkeypatch):
    """Chunks spread over helper threads: the same outputs and gradients, bit
    for bit, as one thread (the weight gradient's chunk sums go in a fixed order)."""
    monkeypatch.setattr(chunks_module, "CHUNK_BYTES", 4096)
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((24, 2, 10, 10)), rng.integers(0, 3, 24)
    spec = {"kind": "cnn", "channels": [3, 4], "kernel": 3, "hidden": [5]}
    results = []
    for helpers in (0, 2):
        monkeypatch.setattr(chunks_module, "helper_threads", lambda helpers=helpers: helpers)
        model = build_model(spec, (2, 10, 10), 3, seed=1, dtype=np.float32)
        loss, _ = model.train_step(x, y)
        results.append((loss, {k: g.copy() for k, g in model.grads.items()}))
    (loss0, grads0), (loss1, grads1) = results
    assert loss0 == loss1
    for name in grads0:
        np.testing.assert_array_equal(grads0[name], grads1[name], err_msg=name)


def test_threads_leave_the_blas_pool_as_it_was(monkeypatch):
    monkeypatch.setattr(chunks_module, "helper_threads", lambda: 1)
    before = chunks_module.blas_threads()
    seen = []
    chunks_module.run_chunks(4, lambda item, slot: seen.append(chunks_module.blas_threads()), np)
    assert chunks_module.blas_threads() == before
    if before is not None:
        assert seen == [1] * 4  # one BLAS thread per caller meanwhile


@pytest.mark.parametrize("spins,pool,helpers", [(True, 2, 0), (False, 2, 1), (False, 1, 0),
                                                (False, 16, chunks_module.MAX_THREADS - 1)])
def test_helpers_only_beside_a_quiet_blas_pool(spins, pool, helpers, monkeypatch):
    monkeypatch.setattr(chunks_module, "blas_spins", lambda: spins)
    monkeypatch.setattr(chunks_module, "blas_threads", lambda: pool)
    assert chunks_module.helper_threads() == helpers


def test_a_thread_error_reaches_the_caller(monkeypatch):
    monkeypatch.setattr(chunks_module, "helper_threads", lambda: 1)
    done = []

    def work(item, slot):
        if item == 3:
            raise KeyError("item 3")
        done.append(item)

    with pytest.raises(KeyError, match="item 3"):
        chunks_module.run_chunks(6, work, np)


@pytest.mark.parametrize("make", [ReLU, lambda: LeakyReLU(0.1), Tanh, Sigmoid],
                         ids=["relu", "leaky_relu", "tanh", "sigmoid"])
def test_pool_then_activation_equals_activation_then_pool(make):
    """build_model pools before activating: for these non-decreasing
    activations that is the same function and the same input gradient."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 6, 6))
    x[0, 0, :2, :2] = -1.0  # a window of ties below ReLU's kink
    dout = rng.standard_normal((2, 3, 3, 3))
    act_a, pool_a = make(), MaxPool2D(2)
    y_a = pool_a.forward(act_a.forward(x.copy()))
    dx_a = act_a.backward(pool_a.backward(dout.copy()))
    pool_b, act_b = MaxPool2D(2), make()
    y_b = act_b.forward(pool_b.forward(x.copy()))
    dx_b = pool_b.backward(act_b.backward(dout.copy()))
    np.testing.assert_allclose(y_b, y_a, rtol=1e-15)
    np.testing.assert_allclose(dx_b, dx_a, rtol=1e-15)
