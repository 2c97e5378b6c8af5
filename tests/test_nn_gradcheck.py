"""Every layer's backward against central finite differences, in float64.

The scalar is a random projection f = sum(forward(x) * R), so dout = R and
every output element matters. Inputs keep away from kinks (ReLU at 0,
max-pool ties) by more than the step.
"""
from __future__ import annotations

import numpy as np
import pytest

from worker.nn import (
    BatchNorm,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    LeakyReLU,
    MaxPool2D,
    ReLU,
    Sigmoid,
    Tanh,
    build_model,
    mse,
    softmax_cross_entropy,
)

F64 = np.float64
STEP = 1e-6
TOL = 1e-6
# A gradient that is exactly zero in theory (a bias just before BatchNorm)
# is roundoff on both sides; relative error means nothing there.
ZERO_NORM = 1e-8


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """norm(a - b) / (norm(a) + norm(b)); 0 when both are zero up to roundoff."""
    scale = np.linalg.norm(a) + np.linalg.norm(b)
    if scale < ZERO_NORM:
        return 0.0
    return float(np.linalg.norm(a - b) / scale)


def numeric_grad(f, array: np.ndarray) -> np.ndarray:
    """Central differences of scalar f() with respect to `array`, perturbed in place."""
    grad = np.zeros_like(array)
    flat, gflat = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + STEP
        plus = f()
        flat[i] = old - STEP
        minus = f()
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * STEP)
    return grad


def away_from_zero(rng: np.random.Generator, shape, low: float = 0.1) -> np.ndarray:
    """Values in +-[low, 1.5]: no element within `low` of the ReLU kink."""
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(low, 1.5, size=shape)


def distinct_values(rng: np.random.Generator, shape) -> np.ndarray:
    """A shuffled grid with spacing 0.05: no max-pool ties, no near-ties."""
    n = int(np.prod(shape))
    return (rng.permutation(n) * 0.05 - n * 0.025).reshape(shape)


def check_layer(layer, x: np.ndarray, seed: int = 0, train: bool = True) -> None:
    rng = np.random.default_rng(seed)
    out = layer.forward(x.copy(), train)
    r = rng.standard_normal(out.shape)

    def f() -> float:
        return float(np.sum(layer.forward(x.copy(), train) * r))

    layer.forward(x.copy(), train)
    dx = layer.backward(r.copy())
    grads = {k: v.copy() for k, v in layer.grads.items()}
    assert dx.shape == x.shape
    err = rel_error(dx, numeric_grad(f, x))
    assert err < TOL, f"{layer!r} dx relative error {err:.2e}"
    for key, param in layer.params.items():
        err = rel_error(grads[key], numeric_grad(f, param))
        assert err < TOL, f"{layer!r} d{key} relative error {err:.2e}"


def test_dense():
    rng = np.random.default_rng(1)
    layer = Dense(5, 3, rng=rng, dtype=F64)
    layer.params["b"][...] = rng.standard_normal(3)
    check_layer(layer, rng.standard_normal((4, 5)))


@pytest.mark.parametrize(
    "stride,padding,size",
    [(1, "same", 5), (1, 0, 5), (1, 3, 4), (2, 1, 6), (2, 0, 7)],
)
def test_conv2d(stride, padding, size):
    rng = np.random.default_rng(2)
    layer = Conv2D(2, 3, 3, stride=stride, padding=padding, rng=rng, dtype=F64)
    layer.params["b"][...] = rng.standard_normal(3)
    check_layer(layer, rng.standard_normal((2, 2, size, size)))


@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_batch_in_chunks(stride, monkeypatch):
    monkeypatch.setattr("worker.nn.chunks.CHUNK_BYTES", 1)  # one image per chunk
    rng = np.random.default_rng(15)
    layer = Conv2D(2, 2, 3, stride=stride, padding=1, rng=rng, dtype=F64)
    layer.params["b"][...] = rng.standard_normal(2)
    check_layer(layer, rng.standard_normal((3, 2, 5, 4)))


@pytest.mark.parametrize("size", [6, 7])  # 7: the last output row/column is not pooled
@pytest.mark.parametrize("phases", [0, 10**6], ids=["grid", "phases"])
def test_conv2d_pooled(size, phases, monkeypatch):
    monkeypatch.setattr("worker.nn.conv.PHASES_MAX_PATCH_PER_OUTPUT", phases)
    rng = np.random.default_rng(16)
    layer = Conv2D(2, 3, 3, pool=2, rng=rng, dtype=F64)
    layer.params["b"][...] = rng.standard_normal(3)
    check_layer(layer, rng.standard_normal((2, 2, size, size)))


def test_conv2d_1x1():
    rng = np.random.default_rng(3)
    layer = Conv2D(3, 2, 1, rng=rng, dtype=F64)
    check_layer(layer, rng.standard_normal((2, 3, 4, 4)))


@pytest.mark.parametrize("size", [4, 5])  # 5: the last row/column is dropped
@pytest.mark.parametrize("kernel", [2, 3])
def test_maxpool(size, kernel):
    rng = np.random.default_rng(4)
    check_layer(MaxPool2D(kernel), distinct_values(rng, (2, 3, size, size)))


def test_maxpool_tie_goes_to_first_maximum():
    x = np.ones((1, 1, 2, 2))
    layer = MaxPool2D(2)
    layer.forward(x)
    dx = layer.backward(np.array([[[[3.0]]]]))
    np.testing.assert_array_equal(dx, [[[[3.0, 0.0], [0.0, 0.0]]]])


def test_flatten():
    rng = np.random.default_rng(5)
    check_layer(Flatten(), rng.standard_normal((3, 2, 2, 2)))


@pytest.mark.parametrize(
    "make",
    [ReLU, lambda: LeakyReLU(0.1), Tanh, Sigmoid],
    ids=["relu", "leaky_relu", "tanh", "sigmoid"],
)
def test_activations(make):
    rng = np.random.default_rng(6)
    check_layer(make(), away_from_zero(rng, (4, 6)))


@pytest.mark.parametrize(
    "make",
    [ReLU, lambda **kw: LeakyReLU(0.1, **kw), Tanh, Sigmoid],
    ids=["relu", "leaky_relu", "tanh", "sigmoid"],
)
def test_inplace_activations_match(make):
    rng = np.random.default_rng(7)
    x = away_from_zero(rng, (3, 5))
    r = rng.standard_normal((3, 5))
    plain, inplace = make(), make(inplace=True)
    y_plain = plain.forward(x.copy())
    y_inplace = inplace.forward(x.copy())
    np.testing.assert_allclose(y_inplace, y_plain, rtol=1e-15)
    np.testing.assert_allclose(inplace.backward(r.copy()), plain.backward(r.copy()), rtol=1e-15)


def test_dropout_fixed_mask():
    rng = np.random.default_rng(8)
    layer = Dropout(0.4)
    layer.set_mask(rng.random((5, 6)) >= 0.4)
    check_layer(layer, rng.standard_normal((5, 6)))


@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 3, 3)], ids=["2d", "4d"])
def test_batchnorm_train(shape):
    rng = np.random.default_rng(9)
    layer = BatchNorm(shape[1], dtype=F64)
    layer.params["gamma"][...] = rng.uniform(0.5, 1.5, shape[1])
    layer.params["beta"][...] = rng.standard_normal(shape[1])
    check_layer(layer, rng.standard_normal(shape) * 2 + 0.5)


@pytest.mark.parametrize("shape", [(6, 4), (3, 2, 3, 3)], ids=["2d", "4d"])
def test_batchnorm_eval(shape):
    rng = np.random.default_rng(10)
    layer = BatchNorm(shape[1], dtype=F64)
    layer.params["gamma"][...] = rng.uniform(0.5, 1.5, shape[1])
    layer.stats["running_mean"][...] = rng.standard_normal(shape[1])
    layer.stats["running_var"][...] = rng.uniform(0.5, 2.0, shape[1])
    check_layer(layer, rng.standard_normal(shape), train=False)


def test_softmax_cross_entropy():
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((5, 4)) * 3
    labels = rng.integers(0, 4, 5)
    _, dlogits = softmax_cross_entropy(logits.copy(), labels)
    num = numeric_grad(lambda: softmax_cross_entropy(logits, labels)[0], logits)
    assert rel_error(dlogits, num) < TOL


def test_softmax_cross_entropy_is_stable():
    logits = np.array([[1000.0, 0.0], [-1000.0, 0.0]])
    loss, dlogits = softmax_cross_entropy(logits, np.array([0, 0]))
    assert np.isfinite(loss) and np.all(np.isfinite(dlogits))
    assert loss == pytest.approx(500.0)


def test_mse():
    rng = np.random.default_rng(12)
    pred, target = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    _, dpred = mse(pred.copy(), target)
    assert rel_error(dpred, numeric_grad(lambda: mse(pred, target)[0], pred)) < TOL


# ---- whole models, through train_step's grads ------------------------------------


def check_model(model, x: np.ndarray, y: np.ndarray) -> None:
    model.train_step(x, y)
    grads = {k: v.copy() for k, v in model.grads.items()}

    def loss() -> float:
        return softmax_cross_entropy(model.forward(x, train=True), y)[0]

    for name, param in model.params.items():
        err = rel_error(grads[name], numeric_grad(loss, param))
        assert err < TOL, f"{name} relative error {err:.2e}"


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_mlp_with_batchnorm_and_dropout(activation):
    spec = {"kind": "mlp", "hidden": [6, 5], "activation": activation,
            "batchnorm": True, "dropout": 0.3}
    model = build_model(spec, (4,), 3, seed=1, dtype=F64)
    rng = np.random.default_rng(13)
    x, y = rng.standard_normal((8, 4)), rng.integers(0, 3, 8)
    for layer in model.layers:
        if isinstance(layer, Dropout):
            keep = np.ones((8, layer_width(model, layer)), bool)
            keep[rng.random(keep.shape) < 0.3] = False
            layer.set_mask(keep)
    check_model(model, x, y)


def layer_width(model, dropout) -> int:
    index = model.layers.index(dropout)
    dense = [layer for layer in model.layers[:index] if isinstance(layer, Dense)][-1]
    return dense.params["W"].shape[1]


@pytest.mark.parametrize(
    "activation,batchnorm", [("leaky_relu", False), ("tanh", True)]
)
def test_cnn(activation, batchnorm):
    spec = {"kind": "cnn", "channels": [2, 3], "kernel": 3, "hidden": [4],
            "activation": activation, "batchnorm": batchnorm}
    model = build_model(spec, (1, 6, 6), 3, seed=2, dtype=F64)
    rng = np.random.default_rng(14)
    x, y = rng.standard_normal((3, 1, 6, 6)), rng.integers(0, 3, 3)
    check_model(model, x, y)
