"""The nn benchmark: its FLOP count, its rows, and `psctl bench nn`."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from worker.bench.nn import (
    CNN_INPUT,
    CNN_SPEC,
    MLP_INPUT,
    MLP_SPEC,
    run_nn_bench,
    train_step_flops,
)
from worker.cli.cmd_bench_nn import nn
from worker.nn import Conv2D, build_model

ROW_KEYS = {"model", "batch", "examples_per_s", "gflops", "matmul_gflops", "ratio"}
CONV_KEYS = {"conv_gflops", "conv_matmul_gflops", "conv_ratio"}


def test_flop_count_of_the_mlp():
    model = build_model(MLP_SPEC, MLP_INPUT, 10)
    model.train_step(np.zeros((4, 784), np.float32), np.zeros(4, int))
    # forward + dW for every layer, dx for all but the first
    n = 4
    expected = 2 * n * (784 * 1024 * 2 + 1024 * 1024 * 3 + 1024 * 10 * 3)
    assert train_step_flops(model) == expected


def test_flop_count_of_the_cnn():
    model = build_model(CNN_SPEC, CNN_INPUT, 10)
    model.train_step(np.zeros((2, 1, 28, 28), np.float32), np.zeros(2, int))
    conv0 = 2 * 8 * 9 * (2 * 28 * 28) * 2          # no input gradient
    conv1 = 2 * 16 * 72 * (2 * 14 * 14) * 3
    dense = 2 * 2 * (784 * 64 * 3 + 64 * 10 * 3)
    assert train_step_flops(model) == conv0 + conv1 + dense
    assert train_step_flops(model, only=Conv2D) == conv0 + conv1


def test_run_nn_bench_rows(monkeypatch):
    monkeypatch.setattr("worker.bench.nn.REPEATS", 2)  # a smoke run, not a measurement
    monkeypatch.setattr("worker.bench.nn.WARMUP_CALLS", 1)
    rows = run_nn_bench("cpu", min_time_s=0.01)
    assert [r["model"].split()[0] for r in rows] == ["mlp", "cnn"]
    for row in rows:
        assert ROW_KEYS <= row.keys()
        assert row["batch"] == 256 and row["device"] == "cpu"
        for key in ("examples_per_s", "gflops", "matmul_gflops", "ratio"):
            assert row[key] > 0 and np.isfinite(row[key])
    assert rows[0]["matmul_gflops"] == rows[1]["matmul_gflops"]
    mlp, cnn = rows
    assert not CONV_KEYS & mlp.keys()
    for key in CONV_KEYS:
        assert cnn[key] > 0 and np.isfinite(cnn[key])
    assert 0 < cnn["conv_flops_per_step"] < cnn["flops_per_step"]
    assert isinstance(cnn["conv_threads"], int) and cnn["conv_threads"] >= 1


FAKE_ROWS = [
    {"model": "mlp 784-1024-1024-10", "batch": 256, "examples_per_s": 1234.5, "gflops": 50.0,
     "matmul_gflops": 60.0, "ratio": 0.8333, "device": "cpu"},
    {"model": "cnn", "batch": 256, "examples_per_s": 999.0, "gflops": 5.0,
     "matmul_gflops": 60.0, "ratio": 0.0833, "device": "cpu",
     "conv_gflops": 12.5, "conv_matmul_gflops": 50.0, "conv_ratio": 0.25},
]


@pytest.fixture
def fake_bench(monkeypatch):
    calls = []

    def fake(device="cpu", *, min_time_s=1.0):
        calls.append((device, min_time_s))
        return FAKE_ROWS

    monkeypatch.setattr("worker.bench.nn.run_nn_bench", fake)
    return calls


def test_cli_table(fake_bench):
    result = CliRunner().invoke(nn, ["--min-time", "0.5"])
    assert result.exit_code == 0, result.output
    assert fake_bench == [("cpu", 0.5)]
    lines = result.output.splitlines()
    assert lines[0] == "device: cpu"
    assert "examples/s" in lines[1] and "matmul GFLOP/s" in lines[1] and "ratio" in lines[1]
    assert "conv GFLOP/s" in lines[1] and "conv ratio" in lines[1]
    assert "1,234" in lines[2] and "0.83" in lines[2]
    assert lines[2].split()[-2:] == ["-", "-"]  # the MLP has no convolutions
    assert lines[3].split()[-2:] == ["12.5", "0.25"]


def test_cli_json(fake_bench):
    result = CliRunner().invoke(nn, ["--json", "--device", "auto"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"results": FAKE_ROWS, "device": "cpu"}
    assert fake_bench == [("auto", 1.0)]


def test_cli_gpu_without_cupy_is_a_click_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    result = CliRunner().invoke(nn, ["--device", "gpu"])
    assert result.exit_code == 1
    assert "Error: --device gpu needs cupy and a CUDA GPU: cupy is not installed" in result.output
    assert "Traceback" not in result.output


def test_cli_rejects_bad_min_time():
    result = CliRunner().invoke(nn, ["--min-time", "0"])
    assert result.exit_code == 2
