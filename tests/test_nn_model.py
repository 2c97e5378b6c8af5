"""The Model API the worker and the servers depend on: names, shapes, seeds,
train/eval modes, statistics deltas, accumulation, in-place loading."""
from __future__ import annotations

import numpy as np
import pytest

from protocol.jobspec import ACTIVATIONS as JOB_ACTIVATIONS
from protocol.jobspec import INITS as JOB_INITS
from protocol.jobspec import SpecError, normalize_section
from worker.nn import BatchNorm, Dropout, build_model
from worker.nn.init import INIT_NAMES
from worker.nn.model import ACTIVATIONS, count_values

MLP = {"kind": "mlp", "hidden": [16, 8], "activation": "relu", "dropout": 0.0,
       "batchnorm": False, "init": "he", "channels": [8, 16], "kernel": 3}
CNN = {**MLP, "kind": "cnn", "channels": [4, 6], "hidden": [12], "batchnorm": True}


def data(shape, n=10, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape)).astype(np.float32), rng.integers(0, classes, n)


def test_mlp_names_and_shapes():
    model = build_model({**MLP, "batchnorm": True}, (8, 8), 10)
    assert model.param_shapes() == {
        "dense0.W": ((64, 16), "float32"), "dense0.b": ((16,), "float32"),
        "bn0.gamma": ((16,), "float32"), "bn0.beta": ((16,), "float32"),
        "dense1.W": ((16, 8), "float32"), "dense1.b": ((8,), "float32"),
        "bn1.gamma": ((8,), "float32"), "bn1.beta": ((8,), "float32"),
        "dense2.W": ((8, 10), "float32"), "dense2.b": ((10,), "float32"),
        "bn0.running_mean": ((16,), "float32"), "bn0.running_var": ((16,), "float32"),
        "bn1.running_mean": ((8,), "float32"), "bn1.running_var": ((8,), "float32"),
    }
    assert model.nonlearned_names() == [
        "bn0.running_mean", "bn0.running_var", "bn1.running_mean", "bn1.running_var"]
    assert set(model.grads) == set(model.params)
    for name, g in model.grads.items():
        assert g.shape == model.params[name].shape and g.dtype == np.float32
    assert model.arrays().keys() == {**model.params, **model.stats}.keys()


def test_mlp_on_flat_input_has_no_flatten():
    model = build_model(MLP, (5,), 2)
    assert type(model.layers[0]).__name__ == "Dense"
    assert model.params["dense0.W"].shape == (5, 16)


def test_cnn_names_and_shapes():
    model = build_model(CNN, (1, 12, 10), 5)
    shapes = {k: s for k, (s, _) in model.param_shapes().items()}
    assert shapes == {
        "conv0.W": (4, 1, 3, 3), "conv0.b": (4,), "bn0.gamma": (4,), "bn0.beta": (4,),
        "conv1.W": (6, 4, 3, 3), "conv1.b": (6,), "bn1.gamma": (6,), "bn1.beta": (6,),
        # 12x10 -> pool 6x5 -> pool 3x2: 6 * 3 * 2 = 36 features
        "dense0.W": (36, 12), "dense0.b": (12,), "bn2.gamma": (12,), "bn2.beta": (12,),
        "dense1.W": (12, 5), "dense1.b": (5,),
        "bn0.running_mean": (4,), "bn0.running_var": (4,),
        "bn1.running_mean": (6,), "bn1.running_var": (6,),
        "bn2.running_mean": (12,), "bn2.running_var": (12,),
    }
    x, _ = data((1, 12, 10), classes=5)
    assert model.forward(x, train=False).shape == (10, 5)


def test_initial_values():
    model = build_model({**CNN, "init": "xavier"}, (1, 8, 8), 3)
    for name, a in model.params.items():
        if name.endswith((".b", ".beta")):
            assert not a.any(), name
        elif name.endswith(".gamma"):
            assert (a == 1).all(), name
    for name, a in model.stats.items():
        assert (a == (1 if name.endswith("var") else 0)).all(), name
    w = build_model({**MLP, "hidden": [2000]}, (500,), 2, seed=3).params["dense0.W"]
    assert w.std() == pytest.approx(np.sqrt(2 / 500), rel=0.02)  # He: N(0, 2/fan_in)
    w = build_model({**MLP, "hidden": [2000], "init": "xavier"}, (500,), 2).params["dense0.W"]
    assert w.std() == pytest.approx(np.sqrt(2 / 2500), rel=0.02)


@pytest.mark.parametrize("spec,shape", [(MLP, (6,)), (CNN, (2, 8, 8))], ids=["mlp", "cnn"])
def test_same_seed_same_arrays_different_seed_different(spec, shape):
    a = build_model(spec, shape, 4, seed=7).arrays()
    b = build_model(spec, shape, 4, seed=7).arrays()
    c = build_model(spec, shape, 4, seed=8).arrays()
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
    assert any(a[n].tobytes() != c[n].tobytes() for n in a if n.endswith(".W"))


def test_float64_dtype():
    model = build_model(CNN, (1, 8, 8), 3, dtype=np.float64)
    assert {dt for _, dt in model.param_shapes().values()} == {"float64"}


def test_dropout_is_off_at_eval_and_seeded_in_training():
    spec = {**MLP, "dropout": 0.5}
    x, _ = data((6,))
    model = build_model(spec, (6,), 3, seed=1)
    assert np.array_equal(model.forward(x, train=False), model.forward(x, train=False))
    plain = build_model({**MLP}, (6,), 3, seed=1)
    np.testing.assert_array_equal(model.forward(x, train=False), plain.forward(x, train=False))
    t1 = model.forward(x, train=True)
    assert not np.array_equal(t1, model.forward(x, train=True))  # a new mask each step
    again = build_model(spec, (6,), 3, seed=1)
    np.testing.assert_array_equal(again.forward(x, train=True), t1)  # same seed, same masks
    other = build_model(spec, (6,), 3, seed=1)
    other.seed_dropout(99)
    assert not np.array_equal(other.forward(x, train=True), t1)


def test_dropout_layer_scales_kept_values():
    layer = Dropout(0.25, seed=0)
    x = np.ones((200, 50), np.float32)
    y = layer.forward(x, train=True)
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert (y == 0).mean() == pytest.approx(0.25, abs=0.02)
    assert layer.forward(x, train=False) is x


def test_batchnorm_eval_uses_running_stats():
    rng = np.random.default_rng(0)
    layer = BatchNorm(3, dtype=np.float64)
    layer.stats["running_mean"][...] = [1.0, -2.0, 0.5]
    layer.stats["running_var"][...] = [4.0, 0.25, 1.0]
    layer.params["gamma"][...] = [2.0, 1.0, 0.5]
    layer.params["beta"][...] = [0.0, 1.0, -1.0]
    x = rng.standard_normal((5, 3, 2, 2))
    before = {k: v.copy() for k, v in layer.stats.items()}
    y = layer.forward(x, train=False)
    m = layer.stats["running_mean"].reshape(1, 3, 1, 1)
    v = layer.stats["running_var"].reshape(1, 3, 1, 1)
    g = layer.params["gamma"].reshape(1, 3, 1, 1)
    b = layer.params["beta"].reshape(1, 3, 1, 1)
    np.testing.assert_allclose(y, g * (x - m) / np.sqrt(v + layer.eps) + b, rtol=1e-12)
    for k, old in before.items():
        np.testing.assert_array_equal(layer.stats[k], old)


def test_batchnorm_train_normalises_and_updates_running_stats():
    rng = np.random.default_rng(1)
    layer = BatchNorm(4, dtype=np.float64)
    x = rng.standard_normal((50, 4)) * 3 + 2
    y = layer.forward(x, train=True)
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=0), 1, rtol=1e-4)
    np.testing.assert_allclose(layer.stats["running_mean"], 0.1 * x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(
        layer.stats["running_var"], 0.9 + 0.1 * x.var(axis=0, ddof=1), rtol=1e-12)


def test_stat_deltas():
    model = build_model(CNN, (1, 8, 8), 3)
    assert all(not d.any() for d in model.stat_deltas().values())  # no step yet
    x, y = data((1, 8, 8))
    before = {k: v.copy() for k, v in model.stats.items()}
    model.train_step(x, y)
    middle = {k: v.copy() for k, v in model.stats.items()}
    deltas = model.stat_deltas()
    assert deltas.keys() == set(model.nonlearned_names())
    for k in deltas:
        np.testing.assert_allclose(deltas[k], middle[k] - before[k], atol=1e-7)
        assert deltas[k].any()
    model.train_step(x[:5], y[:5])  # a new step: deltas cover only it
    for k, d in model.stat_deltas().items():
        np.testing.assert_allclose(d, model.stats[k] - middle[k], atol=1e-7)
    model.evaluate(x, y)  # evaluation changes no statistics
    for k, d in model.stat_deltas().items():
        np.testing.assert_allclose(d, model.stats[k] - middle[k], atol=1e-7)


def test_stat_deltas_cover_a_whole_accumulated_step():
    model = build_model(CNN, (1, 8, 8), 3)
    x, y = data((1, 8, 8))
    model.train_step(x, y)
    before = {k: v.copy() for k, v in model.stats.items()}
    model.train_step(x[:5], y[:5], scale=0.5)
    model.train_step(x[5:], y[5:], accumulate=True, scale=0.5)
    for k, d in model.stat_deltas().items():
        np.testing.assert_allclose(d, model.stats[k] - before[k], atol=1e-7)


@pytest.mark.parametrize("spec,shape", [(MLP, (6,)), ({**CNN, "batchnorm": False}, (1, 8, 8))],
                         ids=["mlp", "cnn"])
def test_accumulated_micro_batches_equal_the_big_batch(spec, shape):
    x, y = data(shape, n=12)
    big = build_model(spec, shape, 3, dtype=np.float64)
    big.train_step(x, y)
    small = build_model(spec, shape, 3, dtype=np.float64)
    small.zero_grad()
    for k in range(3):
        part = slice(4 * k, 4 * k + 4)
        small.train_step(x[part], y[part], accumulate=k > 0, scale=1 / 3)
    for name in big.grads:
        np.testing.assert_allclose(small.grads[name], big.grads[name], rtol=1e-10, atol=1e-14)


def test_scale_and_accumulate_on_top_of_existing_grads():
    x, y = data((6,))
    model = build_model(MLP, (6,), 3, dtype=np.float64)
    model.train_step(x, y)
    one = {k: v.copy() for k, v in model.grads.items()}
    model.train_step(x, y, accumulate=True, scale=2.0)
    for k, g in one.items():
        np.testing.assert_allclose(model.grads[k], 3 * g, rtol=1e-12)
    model.zero_grad()
    assert all(not g.any() for g in model.grads.values())


def test_load_copies_in_place():
    model = build_model(CNN, (1, 8, 8), 3)
    ids = {k: id(v) for k, v in model.arrays().items()}
    other = build_model(CNN, (1, 8, 8), 3, seed=5)
    new = {k: v.copy() for k, v in other.arrays().items()}
    new["dense0.W"] = new["dense0.W"].reshape(-1)  # flat, as frames arrive
    new["bn0.running_var"] = new["bn0.running_var"] + 1
    model.load(new)
    for k, v in model.arrays().items():
        assert id(v) == ids[k]
        np.testing.assert_array_equal(v.reshape(-1), new[k].reshape(-1))
    assert model.params["dense0.W"] is model.layers[9].params["W"]
    with pytest.raises(ValueError, match="no array named"):
        model.load({"dense9.W": np.zeros(3)})
    with pytest.raises(ValueError, match="values"):
        model.load({"dense0.b": np.zeros(3)})


def test_train_step_and_evaluate_values():
    x, y = data((6,), n=20)
    model = build_model(MLP, (6,), 3)
    loss_sum, correct = model.evaluate(x, y)
    logits = model.forward(x, train=False).astype(np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert loss_sum == pytest.approx(-logp[np.arange(20), y].sum(), rel=1e-5)
    assert correct == int((logits.argmax(1) == y).sum())
    loss, acc = model.train_step(x, y)  # no dropout/bn: train forward == eval forward
    assert loss == pytest.approx(loss_sum / 20, rel=1e-5)
    assert acc == pytest.approx(correct / 20)


def test_tiny_mlp_overfits_with_plain_sgd():
    x, y = data((8,), n=32, classes=4, seed=3)
    model = build_model({**MLP, "hidden": [32]}, (8,), 4, seed=0)
    first, _ = model.train_step(x, y)
    for _ in range(300):
        loss, acc = model.train_step(x, y)
        for name, p in model.params.items():
            p -= 0.5 * model.grads[name]
    assert first > 1.0
    assert loss < 0.1 * first and acc == 1.0


def test_input_shape_is_checked():
    model = build_model(MLP, (6,), 3)
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        model.forward(np.zeros((2, 7), np.float32), train=False)
    with pytest.raises(ValueError, match="labels"):
        model.train_step(np.zeros((2, 6), np.float32), np.zeros(3, int))
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 3\)"):
        model.evaluate(np.zeros((2, 6), np.float32), np.array([0, 3]))


@pytest.mark.parametrize(
    "spec,shape,match",
    [
        (CNN, (64,), "image input"),
        (CNN, (8, 8), "image input"),
        ({**CNN, "channels": [4, 4, 4, 4]}, (1, 8, 8), "too small for 4 pooling stages"),
        ({**CNN, "channels": [4]}, (1, 1, 8), "too small"),
        (MLP, (), "input shape"),
        (MLP, (6, 0), "input shape"),
    ],
)
def test_data_that_does_not_fit_the_model(spec, shape, match):
    with pytest.raises(ValueError, match=match):
        build_model(spec, shape, 3)
    with pytest.raises(ValueError, match=match):
        count_values(spec, shape, 3)


def test_a_model_needs_a_class():
    with pytest.raises(ValueError, match="at least one class"):
        build_model(MLP, (6,), 0)


@pytest.mark.parametrize(
    "spec,path",
    [
        ({**CNN, "kernel": 4}, "model.kernel"),
        ({**CNN, "channels": []}, "model.channels"),
        ({**MLP, "kind": "rnn"}, "model.kind"),
        ({**MLP, "activation": "gelu"}, "model.activation"),
        ({**MLP, "init": "lecun"}, "model.init"),
        ({**MLP, "hidden": [0]}, "model.hidden"),
        ({**MLP, "dropout": 1.0}, "model.dropout"),
        ({**MLP, "depth": 3}, "model.depth"),
        ({"hidden": [8]}, "model.kind"),
    ],
)
def test_bad_specs_are_the_job_files_errors(spec, path):
    with pytest.raises(SpecError) as info:
        build_model(spec, (1, 8, 8), 3)
    assert info.value.path == path
    assert str(info.value).startswith(path + ": ") and "\n" not in str(info.value)
    with pytest.raises(SpecError, match=path):
        count_values(spec, (1, 8, 8), 3)


def test_a_partial_spec_takes_the_job_files_defaults():
    partial = {"kind": "mlp", "hidden": [32]}
    full = normalize_section("model", partial)
    a = build_model(partial, (6,), 3, seed=2)
    b = build_model(full, (6,), 3, seed=2)
    assert a.param_shapes() == b.param_shapes()
    assert all(np.array_equal(x, b.arrays()[k]) for k, x in a.arrays().items())
    assert count_values(partial, (6,), 3) == count_values(full, (6,), 3) == a.num_params()
    cnn = build_model({"kind": "cnn"}, (1, 8, 8), 10)
    assert cnn.params["dense0.W"].shape[1] == normalize_section("model", {"kind": "cnn"})["hidden"][0]


def test_the_schema_and_the_layers_know_the_same_names():
    assert tuple(ACTIVATIONS) == JOB_ACTIVATIONS
    assert tuple(INIT_NAMES) == JOB_INITS
