"""The same models on cupy and numpy agree. Skipped without cupy and a usable GPU."""
from __future__ import annotations

import numpy as np
import pytest

from worker.device import DeviceError, select_device
from worker.nn import build_model


@pytest.fixture(scope="module")
def gpu():
    try:
        return select_device("gpu")
    except DeviceError as exc:
        pytest.skip(str(exc))


SPECS = [
    ({"kind": "mlp", "hidden": [32, 16], "activation": "tanh", "batchnorm": True}, (12,)),
    ({"kind": "mlp", "hidden": [32], "activation": "leaky_relu"}, (3, 4)),
    ({"kind": "cnn", "channels": [4, 8], "hidden": [16], "batchnorm": True}, (2, 12, 12)),
    ({"kind": "cnn", "channels": [3], "kernel": 5, "hidden": [], "activation": "sigmoid"},
     (1, 9, 9)),
]


@pytest.mark.parametrize("spec,shape", SPECS)
def test_gpu_matches_cpu(gpu, spec, shape):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, *shape)), rng.integers(0, 5, 16)
    cpu_model = build_model(spec, shape, 5, seed=3, dtype=np.float64)
    gpu_model = build_model(spec, shape, 5, seed=3, dtype=np.float64, xp=gpu.xp)
    for name, a in cpu_model.arrays().items():
        np.testing.assert_array_equal(gpu.to_host(gpu_model.arrays()[name]), a)
    for k in range(2):
        part = slice(8 * k, 8 * k + 8)
        cpu_out = cpu_model.train_step(x[part], y[part], accumulate=k > 0, scale=0.5)
        gpu_out = gpu_model.train_step(gpu.to_device(x[part]), gpu.to_device(y[part]),
                                       accumulate=k > 0, scale=0.5)
        np.testing.assert_allclose(gpu_out, cpu_out, rtol=1e-9)
    for name, g in cpu_model.grads.items():
        np.testing.assert_allclose(gpu.to_host(gpu_model.grads[name]), g, rtol=1e-8, atol=1e-12)
    gpu_deltas = gpu_model.stat_deltas()
    for name, d in cpu_model.stat_deltas().items():
        np.testing.assert_allclose(gpu.to_host(gpu_deltas[name]), d, rtol=1e-8, atol=1e-12)
    cpu_eval = cpu_model.evaluate(x, y)
    gpu_eval = gpu_model.evaluate(gpu.to_device(x), gpu.to_device(y))
    assert gpu_eval[1] == cpu_eval[1]
    assert gpu_eval[0] == pytest.approx(cpu_eval[0], rel=1e-9)


def test_gpu_dropout_and_load(gpu):
    spec = {"kind": "mlp", "hidden": [64], "dropout": 0.5}
    model = build_model(spec, (10,), 3, xp=gpu.xp)
    x = gpu.to_device(np.ones((32, 10), np.float32))
    y = gpu.to_device(np.zeros(32, np.int64))
    model.train_step(x, y)
    model.train_step(x, y, accumulate=True)
    ids = {k: id(v) for k, v in model.arrays().items()}
    host = {k: np.full(v.shape, 0.5, np.float32) for k, v in model.arrays().items()}
    model.load(host)
    assert {k: id(v) for k, v in model.arrays().items()} == ids
    assert float(model.params["dense0.W"].sum()) == pytest.approx(0.5 * 640)


def test_gpu_bench_runs(gpu, monkeypatch):
    from worker.bench.nn import run_nn_bench

    monkeypatch.setattr("worker.bench.nn.REPEATS", 2)
    rows = run_nn_bench("gpu", min_time_s=0.05)
    assert {r["device"] for r in rows} == {"gpu"}
    assert all(r["ratio"] > 0 for r in rows)
