"""The benchmark behind `psctl bench nn`: train_step throughput of the backprop
library against the array module's own matmul speed, measured in the same run.

FLOP count (documented so that "gflops" means one thing): only the
multiply-adds of one train_step's matmuls and convolutions are counted, 2
FLOPs each, exactly those the pass needs:

- Dense (batch N, in I, out O): forward x@W 2NIO, dW = x.T@dout 2NIO, and
  dx = dout@W.T 2NIO except in the first learned layer, whose input gradient
  is never computed;
- Conv2D (Cout, K = Cin*k*k, P = N*Ho*Wo output positions): forward
  2*Cout*K*P, dW 2*Cout*K*P, dx 2*Cout*K*P (again not for the first conv).
  These are the convolution's own FLOPs, whatever its layout computes on
  top (Conv2D's layouts also run the matmuls over border positions they
  throw away, and add the bias through a row of ones: neither is counted).

Bias adds, activations, softmax, BatchNorm, pooling and im2col copies are
real work but are not counted, so `ratio` = achieved GFLOP/s over matmul
GFLOP/s is the share of the step that goes to useful matmul speed.

"matmul_gflops" times the MLP's own matmuls (the same shapes and transposed
operands as its forward and backward, into preallocated outputs) on their
own: the ceiling a numpy/cupy MLP step can reach on this machine.

For the CNN, the convolution layers are also timed on their own (forward
and backward of each Conv2D on the activations and gradients of a real
train_step, nothing else): `conv_gflops` is their FLOPs over that time, and
`conv_ratio` its ratio to `conv_matmul_gflops`, a square float32 matmul of
about the same FLOPs run alone, i.e. how close the convolutions come to the
array module's matmul speed on work of their size.
"""
from __future__ import annotations

import functools
import itertools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from worker.device import select_device
from worker.nn import chunks as chunking
from worker.nn.conv import Conv2D
from worker.nn.layers import Dense
from worker.nn.losses import softmax_cross_entropy
from worker.nn.model import Model, build_model

BATCH = 256
NUM_CLASSES = 10
REPEATS = 7  # median of this many timed blocks per figure
WARMUP_CALLS = 2

MLP_SPEC = {"kind": "mlp", "hidden": [1024, 1024], "activation": "relu",
            "dropout": 0.0, "batchnorm": False, "init": "he"}
MLP_INPUT = (784,)
CNN_SPEC = {"kind": "cnn", "channels": [8, 16], "kernel": 3, "hidden": [64],
            "activation": "relu", "dropout": 0.0, "batchnorm": False, "init": "he"}
CNN_INPUT = (1, 28, 28)


def train_step_flops(model: Model, *, only: type | None = None) -> int:
    """FLOPs of the model's last train_step (see the module docstring); with
    `only`, of the layers of that class alone."""
    flops = 0
    seen_learned = False
    for layer in model.layers:
        passes = 3 if seen_learned else 2  # forward, dW, and dx after the first learned layer
        seen_learned = seen_learned or bool(layer.params)
        if only is not None and not isinstance(layer, only):
            continue
        if isinstance(layer, Dense):
            n, i = layer._x.shape
            o = layer.params["W"].shape[1]
            flops += 2 * n * i * o * passes
        elif isinstance(layer, Conv2D):
            flops += 2 * layer.macs() * passes
    return flops


def _interleaved_seconds(
    fns: dict[str, Callable[[], Any]], sync: Callable[[], None], min_time_s: float
) -> dict[str, list[float]]:
    """Seconds per call of each function, REPEATS times, the functions taking
    turns within each repeat so that a load change on a shared machine hits
    them alike. Each function gets about min_time_s of timed calls in all."""
    calls = {}
    for name, fn in fns.items():
        for _ in range(WARMUP_CALLS):
            fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        once = max(time.perf_counter() - start, 1e-9)
        calls[name] = max(1, math.ceil(min_time_s / REPEATS / once))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(REPEATS):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / calls[name])
    return times


def _mlp_matmuls(xp: Any, batch: int, widths: list[int]) -> tuple[Callable[[], None], int]:
    """A function running the MLP's forward and backward matmuls, and their FLOPs."""
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> Any:
        return xp.asarray(rng.standard_normal(shape, dtype=np.float32))

    calls: list[tuple[Any, Any, Any]] = []
    flops = 0
    for index, (i, o) in enumerate(itertools.pairwise(widths)):
        x, w, dout = rand(batch, i), rand(i, o), rand(batch, o)
        calls.append((x, w, xp.empty((batch, o), np.float32)))  # forward
        calls.append((x.T, dout, xp.empty((i, o), np.float32)))  # dW
        flops += 4 * batch * i * o
        if index > 0:
            calls.append((dout, w.T, xp.empty((batch, i), np.float32)))  # dx
            flops += 2 * batch * i * o

    def run() -> None:
        for a, b, out in calls:
            xp.matmul(a, b, out=out)

    return run, flops


def _square_matmul(xp: Any, flops: int) -> tuple[Callable[[], None], int]:
    """A function running one float32 n x n matmul of about `flops`, and its FLOPs."""
    n = max(64, round((flops / 2) ** (1 / 3) / 64) * 64)
    rng = np.random.default_rng(2)
    a, b = (xp.asarray(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    out = xp.empty((n, n), np.float32)
    return functools.partial(xp.matmul, a, b, out=out), 2 * n ** 3


def _conv_layers(model: Model, x: Any, y: Any) -> Callable[[], None]:
    """A function running forward and backward of the model's Conv2D layers
    alone, on the inputs and output gradients of one real train_step."""
    inputs: dict[int, Any] = {}
    grads: dict[int, Any] = {}
    convs = [i for i, layer in enumerate(model.layers) if isinstance(layer, Conv2D)]
    h = x
    for i, layer in enumerate(model.layers):
        if i in convs:
            inputs[i] = h
        h = layer.forward(h, True)
    _, d = softmax_cross_entropy(h, y)
    for i in range(len(model.layers) - 1, convs[0] - 1, -1):
        if i in convs:
            grads[i] = d.copy()  # a later layer's in-place backward may reuse d
        d = model.layers[i].backward(d, need_dx=i > convs[0])

    def run() -> None:
        for i in convs:
            model.layers[i].forward(inputs[i], True)
        for i in reversed(convs):
            model.layers[i].backward(grads[i], need_dx=i > convs[0])

    return run


def run_nn_bench(device: str = "cpu", *, min_time_s: float = 1.0) -> list[dict[str, Any]]:
    """Time train_step of the benchmark MLP and CNN; one row per model.

    Rows: model, batch, examples_per_s, gflops, matmul_gflops, ratio (the
    median over repeats of gflops / matmul_gflops, each pair timed back to
    back), plus ms_per_step, flops_per_step and device; the CNN's row adds
    conv_gflops, conv_matmul_gflops and conv_ratio (module docstring), and
    conv_threads, the threads its image layers spread their chunks over
    (worker/nn/chunks.py).
    Takes about 5 * min_time_s plus warm-up. Raises DeviceError when
    `device` cannot be used.
    """
    dev = select_device(device)
    xp = dev.xp
    widths = [MLP_INPUT[0], *MLP_SPEC["hidden"], NUM_CLASSES]
    matmuls, matmul_flops = _mlp_matmuls(xp, BATCH, widths)
    cnn_label = "cnn 1x28x28 c[8,16] h[64]"
    cases = {
        f"mlp {'-'.join(map(str, widths))}": (MLP_SPEC, MLP_INPUT),
        cnn_label: (CNN_SPEC, CNN_INPUT),
    }
    rng = np.random.default_rng(1)
    models: dict[str, Model] = {}
    fns: dict[str, Callable[[], Any]] = {"matmul": matmuls}
    for label, (spec, shape) in cases.items():
        model = build_model(spec, shape, NUM_CLASSES, seed=0, xp=xp)
        x = xp.asarray(rng.standard_normal((BATCH, *shape), dtype=np.float32))
        y = xp.asarray(rng.integers(0, NUM_CLASSES, BATCH))
        models[label] = model
        fns[label] = functools.partial(model.train_step, x, y)
        if label == cnn_label:
            fns["conv layers"] = _conv_layers(model, x, y)
    cnn = models[cnn_label]
    conv_flops = train_step_flops(cnn, only=Conv2D)
    fns["square matmul"], square_flops = _square_matmul(xp, conv_flops)
    times = _interleaved_seconds(fns, dev.synchronize, min_time_s)
    matmul_gflops = matmul_flops / statistics.median(times["matmul"]) / 1e9

    rows = []
    for label, model in models.items():
        flops = train_step_flops(model)
        seconds = statistics.median(times[label])
        ratios = [(flops / t) / (matmul_flops / m) for t, m in zip(times[label], times["matmul"])]
        row = {
            "model": label,
            "batch": BATCH,
            "examples_per_s": BATCH / seconds,
            "gflops": flops / seconds / 1e9,
            "matmul_gflops": matmul_gflops,
            "ratio": statistics.median(ratios),
            "ms_per_step": seconds * 1e3,
            "flops_per_step": flops,
            "device": dev.name,
        }
        if model is cnn:
            conv_times, square_times = times["conv layers"], times["square matmul"]
            conv_ratios = [(conv_flops / t) / (square_flops / m)
                           for t, m in zip(conv_times, square_times)]
            row.update({
                "conv_gflops": conv_flops / statistics.median(conv_times) / 1e9,
                "conv_matmul_gflops": square_flops / statistics.median(square_times) / 1e9,
                "conv_ratio": statistics.median(conv_ratios),
                "conv_ms_per_step": statistics.median(conv_times) * 1e3,
                "conv_flops_per_step": conv_flops,
                "conv_threads": 1 + (chunking.helper_threads() if xp is np else 0),
            })
        rows.append(row)
    return rows


COLUMNS = (  # (header, row key, format); a row without the key shows "-"
    ("model", "model", "{}"),
    ("batch", "batch", "{}"),
    ("examples/s", "examples_per_s", "{:,.0f}"),
    ("GFLOP/s", "gflops", "{:.1f}"),
    ("matmul GFLOP/s", "matmul_gflops", "{:.1f}"),
    ("ratio", "ratio", "{:.2f}"),
    ("conv GFLOP/s", "conv_gflops", "{:.1f}"),
    ("conv ratio", "conv_ratio", "{:.2f}"),
)


def format_table(rows: list[dict]) -> str:
    """Rows as an aligned text table (text left, numbers right)."""
    cells = [[fmt.format(row[key]) if key in row else "-" for _, key, fmt in COLUMNS]
             for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(COLUMNS)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([line([h for h, _, _ in COLUMNS]), *(line(c) for c in cells)])
