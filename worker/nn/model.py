"""Models built from a job's `model:` section, and the API the worker drives.

`build_model(spec, input_shape, num_classes, seed=...)` stacks the layers;
`Model` exposes its arrays under stable names ("dense0.W", "bn0.running_var")
that the parameter servers shard, and runs one training step at a time:

    model = build_model(spec, (1, 28, 28), 10, seed=job_seed)
    client.pull(out=model.arrays())            # in place
    loss, acc = model.train_step(x, y)         # fills model.grads
    client.push_pull({**model.grads, **model.stat_deltas()}, clock=t, out=model.arrays())

Micro-batches: call train_step(xk, yk, accumulate=k > 0, scale=1/K) for
k = 0..K-1; the grads are then the mean over the K micro-batches.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from protocol.jobspec import normalize_section
from worker.nn.conv import Conv2D, MaxPool2D
from worker.nn.layers import Dense, Dropout, Flatten, Layer, LeakyReLU, ReLU, Sigmoid, Tanh
from worker.nn.losses import cross_entropy_sum_and_correct, softmax_cross_entropy
from worker.nn.norm import BatchNorm

LEAKY_RELU_ALPHA = 0.01
POOL_SIZE = 2  # every cnn stage ends in a 2x2, stride-2 max pool

ACTIVATIONS = {
    "relu": ReLU,
    "leaky_relu": lambda *, inplace: LeakyReLU(LEAKY_RELU_ALPHA, inplace=inplace),
    "tanh": Tanh,
    "sigmoid": Sigmoid,
}

# Stream ids under the job seed: one for weights, one for dropout masks.
_INIT_STREAM, _DROPOUT_STREAM = 0, 1


class RowBlocks:
    """The dW of a dense layer whose backward was deferred: its rows, made on demand.

    `rows(start, stop)` is a new (stop - start, out) array each call
    (Dense.grad_rows), valid until the layer's next forward.
    """

    def __init__(self, layer: Dense) -> None:
        self.layer = layer
        self.shape = tuple(layer.params["W"].shape)

    def rows(self, start: int, stop: int) -> Any:
        return self.layer.grad_rows(start, stop)


class Model:
    """A stack of layers with named parameters, gradients and statistics."""

    def __init__(
        self,
        layers: list[Layer],
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        xp: Any = np,
        dtype: Any = np.float32,
    ) -> None:
        self.layers = layers
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.params: dict[str, Any] = {}
        self.grads: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}
        counts: dict[str, int] = {}
        for layer in layers:
            index = counts.get(layer.kind, 0)
            counts[layer.kind] = index + 1
            layer.name = f"{layer.kind}{index}"
            for key, value in layer.params.items():
                self.params[f"{layer.name}.{key}"] = value
                self.grads[f"{layer.name}.{key}"] = layer.grads[key]
            for key, value in layer.stats.items():
                self.stats[f"{layer.name}.{key}"] = value
        # Layers before the first one with parameters need no input gradient.
        with_params = [i for i, layer in enumerate(layers) if layer.params]
        self._first_learned = with_params[0] if with_params else len(layers)
        self._stats_before: dict[str, Any] | None = None

    # ---- the arrays the parameter client moves ------------------------------

    def arrays(self) -> dict[str, Any]:
        """Learned parameters and running statistics together (the same arrays)."""
        return {**self.params, **self.stats}

    def nonlearned_names(self) -> list[str]:
        """Names of the running statistics (pushed as deltas, not gradients)."""
        return list(self.stats)

    def param_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype name) for every array the servers hold."""
        return {name: (tuple(int(d) for d in a.shape), a.dtype.name)
                for name, a in self.arrays().items()}

    def num_params(self) -> int:
        """Number of learned scalars."""
        return sum(int(a.size) for a in self.params.values())

    def load(self, arrays: dict[str, Any]) -> None:
        """Copy values into the existing params/stats in place (flat or shaped)."""
        own = self.arrays()
        for name, value in arrays.items():
            if name not in own:
                raise ValueError(f"model has no array named {name!r}")
            target = own[name]
            value = self.xp.asarray(value)
            if value.size != target.size:
                raise ValueError(
                    f"array {name!r} has {target.size} values, got {value.size}"
                )
            target[...] = value.reshape(target.shape)

    def zero_grad(self) -> None:
        """Set every gradient to zero, in place."""
        for g in self.grads.values():
            g.fill(0)

    @property
    def has_dropout(self) -> bool:
        return any(isinstance(x, Dropout) for x in self.layers)

    def seed_dropout(self, seed: int) -> None:
        """Restart every dropout stream from `seed` (e.g. a per-worker seed)."""
        for index, layer in enumerate(x for x in self.layers if isinstance(x, Dropout)):
            layer.reseed(_dropout_seed(seed, index))

    # ---- passes ---------------------------------------------------------------

    def forward(self, x: Any, train: bool, *,
                before_layer: Callable[[list[str]], None] | None = None) -> Any:
        """Return the logits (N, num_classes) of `x` (N, *input_shape).

        before_layer: called with a layer's array names before its forward (a
        worker waits there for just those parameters of the step to arrive).
        """
        x = self._check_x(x)
        for layer in self.layers:
            if before_layer is not None and (layer.params or layer.stats):
                before_layer([f"{layer.name}.{key}" for key in (*layer.params, *layer.stats)])
            x = layer.forward(x, train)
        return x

    def backward(self, dlogits: Any, *, accumulate: bool = False,
                 on_layer: Callable[[dict[str, Any]], None] | None = None, defer: bool = False) -> None:
        """Fill `grads` from dloss/dlogits of the last forward (added with accumulate).

        on_layer: called with each layer's gradients ({model name: array}) as soon as that
        layer's backward is done, last layer first, while the earlier layers are still to
        compute: the worker sends them then (communication overlapped with backprop).
        defer (with on_layer, not accumulate): a dense layer's dW is not computed here;
        on_layer gets a RowBlocks for it instead, whose rows are made as they are sent, and
        `grads` keeps no dW at all.
        """
        dout = dlogits
        first = self._first_learned
        defer = defer and on_layer is not None and not accumulate
        for i in range(len(self.layers) - 1, first - 1, -1):
            layer = self.layers[i]
            if defer and isinstance(layer, Dense):
                dout = layer.backward(dout, need_dx=i > first, defer_w=True)
                on_layer({f"{layer.name}.W": RowBlocks(layer), f"{layer.name}.b": layer.grads["b"]})
                continue
            dout = layer.backward(dout, accumulate=accumulate, need_dx=i > first)
            if on_layer is not None and layer.grads:
                on_layer({f"{layer.name}.{key}": g for key, g in layer.grads.items()})

    def train_step(
        self, x: Any, y: Any, *, accumulate: bool = False, scale: float = 1.0,
        on_layer: Callable[[dict[str, Any]], None] | None = None, defer: bool = False,
        before_layer: Callable[[list[str]], None] | None = None,
    ) -> tuple[float, float]:
        """One forward (train mode) + softmax cross-entropy + backward.

        grads = scale * (batch-mean gradient), added to the existing grads with
        `accumulate`. Returns (mean loss, accuracy) of this batch. The
        running-statistics change is kept for `stat_deltas()`: from before this
        step, or, with `accumulate`, from before the step that started the
        accumulation (so a micro-batched step reports its whole change).
        """
        x, y = self._check_x(x), self._check_y(y, x)
        if not accumulate or self._stats_before is None:
            self._snapshot_stats()
        logits = self.forward(x, train=True, before_layer=before_layer)
        loss, dlogits = softmax_cross_entropy(logits, y)
        accuracy = float((logits.argmax(axis=1) == y).mean())
        if scale != 1.0:
            dlogits *= scale
        self.backward(dlogits, accumulate=accumulate, on_layer=on_layer, defer=defer)
        return loss, accuracy

    def stat_deltas(self) -> dict[str, Any]:
        """Running statistics now minus before the last train_step (zeros if none)."""
        if self._stats_before is None:
            return {k: self.xp.zeros_like(v) for k, v in self.stats.items()}
        return {k: v - self._stats_before[k] for k, v in self.stats.items()}

    def evaluate(self, x: Any, y: Any) -> tuple[float, int]:
        """(summed cross-entropy, number correct) of one batch in eval mode."""
        x, y = self._check_x(x), self._check_y(y, x)
        logits = self.forward(x, train=False)
        return cross_entropy_sum_and_correct(logits, y)

    def summary(self) -> str:
        """One line per layer with its arrays' shapes."""
        lines = []
        for layer in self.layers:
            shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in layer.params.items())
            lines.append(f"{layer.name:<12} {type(layer).__name__:<10} {shapes}")
        lines.append(f"{self.num_params()} learned parameters")
        return "\n".join(lines)

    # ---- helpers ----------------------------------------------------------------

    def _snapshot_stats(self) -> None:
        if self._stats_before is None:
            self._stats_before = {k: v.copy() for k, v in self.stats.items()}
        else:
            for k, v in self.stats.items():
                self._stats_before[k][...] = v

    def _check_x(self, x: Any) -> Any:
        x = self.xp.asarray(x)
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"model input must have shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        return x

    def _check_y(self, y: Any, x: Any) -> Any:
        y = self.xp.asarray(y)
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        if y.dtype.kind not in "iu":
            y = y.astype(np.int64)
        # cupy does not bounds-check fancy indexing: a bad label would be garbage there.
        if y.size and bool(((y < 0) | (y >= self.num_classes)).any()):
            raise ValueError(f"labels must be integers in [0, {self.num_classes})")
        return y


def build_model(
    spec: dict[str, Any],
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int = 0,
    xp: Any = np,
    dtype: Any = np.float32,
) -> Model:
    """Build the Model of a `model:` spec, normalized by protocol/jobspec.py
    (a partial spec takes the job file's defaults and rules).

    mlp: [Flatten] -> per hidden width Dense -> [BatchNorm] -> act -> [Dropout]
         -> Dense(num_classes).
    cnn: per channel count Conv2D(kernel, 'same') -> [BatchNorm] -> MaxPool2D(2)
         -> act, then Flatten and the mlp part; without BatchNorm the pool is
         Conv2D's own (pool=2).
    One seed gives bit-identical initial weights (drawn on the host) and the
    dropout streams. Raises ValueError (one sentence) for a bad spec (SpecError,
    naming the field) or one the data cannot fit.
    """
    spec = normalize_section("model", spec)
    input_shape = tuple(int(d) for d in input_shape)
    _check_fit(spec, input_shape, num_classes)
    init_rng = np.random.default_rng(np.random.SeedSequence([seed, _INIT_STREAM]))
    make_act = ACTIVATIONS[spec["activation"]]
    bn, p_drop, init = bool(spec["batchnorm"]), float(spec["dropout"]), spec["init"]
    layers: list[Layer] = []
    shape = input_shape
    if spec["kind"] == "cnn":
        kernel = int(spec["kernel"])
        for channels in spec["channels"]:
            # Pool, then activate: every activation here is non-decreasing, so
            # the max of the activated window is the activated max, and the
            # gradient is the same (a different winner only where the
            # activation is flat), on a quarter of the values. Without
            # BatchNorm between them the convolution pools its own output.
            conv = Conv2D(shape[0], int(channels), kernel, padding="same",
                          pool=None if bn else POOL_SIZE, init=init, rng=init_rng,
                          xp=xp, dtype=dtype)
            layers.append(conv)
            shape = conv.output_shape(shape)
            if bn:
                layers.append(BatchNorm(int(channels), xp=xp, dtype=dtype))
                pool = MaxPool2D(POOL_SIZE)
                layers.append(pool)
                shape = pool.output_shape(shape)
            layers.append(make_act(inplace=True))
    if len(shape) != 1:
        layers.append(Flatten())
    width = math.prod(shape)
    n_dropout = 0
    for hidden in spec["hidden"]:
        layers.append(Dense(width, int(hidden), init=init, rng=init_rng, xp=xp, dtype=dtype))
        if bn:
            layers.append(BatchNorm(int(hidden), xp=xp, dtype=dtype))
        layers.append(make_act(inplace=True))
        if p_drop > 0.0:
            layers.append(Dropout(p_drop, seed=_dropout_seed(seed, n_dropout), xp=xp))
            n_dropout += 1
        width = int(hidden)
    layers.append(Dense(width, num_classes, init=init, rng=init_rng, xp=xp, dtype=dtype))
    return Model(layers, input_shape, num_classes, xp=xp, dtype=dtype)


def count_values(spec: dict[str, Any], input_shape: tuple[int, ...], num_classes: int) -> int:
    """How many values build_model's arrays (parameters and running statistics) hold, without building it.

    A worker checks a job's model against the scheduler's size limit with
    this before it allocates anything (a model too large must fail the job,
    not the worker's process).
    """
    spec = normalize_section("model", spec)
    _check_fit(spec, tuple(int(d) for d in input_shape), num_classes)
    per_norm = 4 if spec["batchnorm"] else 0   # gamma, beta, running mean and variance
    count = 0
    shape = tuple(int(d) for d in input_shape)
    if spec["kind"] == "cnn":
        k = int(spec["kernel"])
        for channels in spec["channels"]:
            count += int(channels) * shape[0] * k * k + int(channels) + per_norm * int(channels)
            shape = (int(channels), shape[1] // POOL_SIZE, shape[2] // POOL_SIZE)
    width = math.prod(shape)
    for hidden in spec["hidden"]:
        count += width * int(hidden) + int(hidden) + per_norm * int(hidden)
        width = int(hidden)
    return count + width * num_classes + num_classes


def _dropout_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, _DROPOUT_STREAM, index]).generate_state(1)[0])


def _check_fit(spec: dict[str, Any], input_shape: tuple[int, ...], num_classes: int) -> None:
    """What a normalized spec cannot say alone: whether this data fits the model."""
    if num_classes < 1:
        raise ValueError(f"a model needs at least one class, got num_classes={num_classes}")
    if not input_shape or any(d < 1 for d in input_shape):
        raise ValueError(f"input shape {input_shape} must be non-empty with sizes >= 1")
    if spec["kind"] != "cnn":
        return
    if len(input_shape) != 3:
        raise ValueError(
            f"a cnn needs image input shaped (channels, height, width), got input shape "
            f"{input_shape}; use kind mlp for flat features"
        )
    stages = len(spec["channels"])
    _, h, w = input_shape
    for stage in range(stages):
        h, w = h // POOL_SIZE, w // POOL_SIZE
        if h < 1 or w < 1:
            raise ValueError(
                f"input {input_shape[1]}x{input_shape[2]} is too small for {stages} "
                f"pooling stages: it shrinks to nothing at stage {stage + 1}"
            )
