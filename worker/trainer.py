"""The single-process reference trainer, and the step pieces the worker shares.

`LocalTrainer` runs a job's model, data order and optimizer math in one
process with no sockets: what one worker of the cluster computes, with the
servers' update applied locally by an `update` object the caller passes
(`ps.optim.Updater`; worker/ never imports ps/). It is the yardstick the
cluster is checked against, and `psctl train-local`.

One step: batch(t) -> `accumulate_gradients` over data.micro_batches ->
`global_norm` of the learned gradients -> update.apply(params, grads,
step=t, norm=norm). BatchNorm running statistics are already updated in
place by the forward pass, so they are not passed to the updater (the
cluster pushes them as deltas; here they would be applied twice).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from protocol.partitions import schedule_length, steps_owed
from worker.data import Dataset, load_dataset, worker_batches

# Elements per float64 chunk in global_norm: the same chunking as
# ps.optim.global_norm, so both sides sum in the same order and agree to the bit.
NORM_CHUNK_ELEMS = 32 * 1024
EVAL_BATCH = 512


def global_norm(grads: Mapping[str, Any], *, skip=()) -> float:
    """L2 norm of every element of `grads` except the tensors named in `skip`.

    Accumulated in float64, chunk by chunk, as ps.optim.global_norm does
    (the formula the servers use to clip by the pushing worker's norm).
    """
    skip = frozenset(skip)
    total = 0.0
    for name, g in grads.items():
        if name in skip:
            continue
        flat = g.reshape(-1)
        for lo in range(0, flat.size, NORM_CHUNK_ELEMS):
            c = flat[lo:lo + NORM_CHUNK_ELEMS].astype(np.float64)
            total += float(c.dot(c))
    return math.sqrt(total)


def evaluate(model, dataset: Dataset, *, batch_size: int = EVAL_BATCH, xp=None) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` over all of `dataset`, in eval
    mode (dropout off, BatchNorm on its running statistics)."""
    xp = xp if xp is not None else model.xp
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{dataset.name}: cannot evaluate on an empty dataset")
    loss_sum, correct = 0.0, 0
    for lo in range(0, n, batch_size):
        x, y = dataset.take(np.arange(lo, min(lo + batch_size, n)))
        ls, c = model.evaluate(xp.asarray(x), xp.asarray(y))
        loss_sum += float(ls)
        correct += int(c)
    return loss_sum / n, correct / n


def accumulate_gradients(model, x, y, micro_batches: int, *, accumulate: bool = False,
                         scale: float = 1.0) -> tuple[float, float]:
    """Fill model.grads with `scale` times the gradient of the whole batch (x, y),
    computed in `micro_batches` consecutive pieces (added to the grads already
    there with `accumulate`); returns the batch's (mean loss, accuracy).

    Piece i runs train_step(accumulate=i > 0, scale=len_i / len(x)) -- 1/k
    for the equal pieces a valid job has -- so the sum is the one-batch mean
    gradient. Exact for models without BatchNorm; with BatchNorm each piece
    normalises by its own statistics, as micro-batching does everywhere.
    """
    n = len(x)
    k = int(micro_batches)
    if not 1 <= k <= n:
        raise ValueError(f"micro_batches must be in 1..{n} (the batch size), found {micro_batches}")
    if k == 1:
        return model.train_step(x, y, accumulate=accumulate, scale=scale)
    loss = acc = 0.0
    edges = [n * i // k for i in range(k + 1)]
    for i in range(k):
        a, b = edges[i], edges[i + 1]
        w = (b - a) / n
        li, ai = model.train_step(x[a:b], y[a:b], accumulate=accumulate or i > 0, scale=w * scale)
        loss += li * w
        acc += ai * w
    return loss, acc


def total_steps(spec: Mapping, train_size: int) -> int:
    """Steps of the job run as one partition of `train_size` examples (protocol/partitions.py)."""
    return steps_owed(spec, train_size, num=1)[0]


@dataclass
class TrainResult:
    """What a run achieved. examples_per_s counts training time only (not evaluation)."""

    test_accuracy: float
    test_loss: float
    final_loss: float          # training loss of the last step's batch
    steps: int
    wall_s: float
    examples_per_s: float
    history: list[dict] = field(default_factory=list, repr=False)
    stopped: str = "steps"     # steps | target (target_accuracy reached) | diverged (loss not finite)

    def summary(self) -> dict:
        """The result without the per-step history (for --json)."""
        out = asdict(self)
        del out["history"]
        return out


class LocalTrainer:
    """Single-process reference trainer: the same model, data order and optimizer math the cluster uses.

    spec: a normalized job spec (protocol/jobspec.py). update: either an object with
    `.apply(params, grads, *, step, norm)` that updates params in place, or
    a factory `update(arrays, nonlearned_names, optimizer) -> such an object`,
    called with the model's host arrays and the job's optimizer spec (its
    schedule's length filled in) (pass `ps.optim.Updater` wrapped so). The
    default data order is worker 0 of 1 (`worker_batches`); `batches`, a
    callable step -> (x, y), replaces it (tests feed what N workers would
    see). device: "cpu", "gpu", "auto" or a worker.device.Device. Raises
    DataError for a bad data source, DeviceError for an unusable device,
    ValueError for a model that does not fit the data.
    """

    def __init__(self, spec: dict, *, update, device: Any = "cpu",
                 progress: Callable[[dict], None] | None = None,
                 batches: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None):
        from worker.device import select_device
        from worker.nn.model import build_model

        self.spec = spec
        self.device = select_device(device) if isinstance(device, str) else device
        self.xp = self.device.xp
        seed = int(spec["seed"])
        data = spec["data"]
        self.train_set, self.test_set = load_dataset(data, seed=seed)
        self.model = build_model(spec["model"], self.train_set.input_shape, self.train_set.num_classes,
                                 seed=seed, xp=self.xp)
        self.batch_size = int(data["batch_size"])
        self.micro_batches = int(data.get("micro_batches", 1))
        if batches is None:
            batches = worker_batches(self.train_set, k=0, num=1, batch_size=self.batch_size, seed=seed).batch
        self._batches = batches
        self.steps_per_epoch = math.ceil(len(self.train_set) / self.batch_size)
        self.total_steps = total_steps(spec, len(self.train_set))
        # A cosine schedule of an `epochs:` job decays over the steps just counted.
        self.spec = spec = {**spec, "optimizer": schedule_length(spec, [self.total_steps])}
        self.eval_every = int(spec.get("eval_every") or 0) or self.steps_per_epoch
        self.target_accuracy = spec.get("target_accuracy")
        self.progress = progress
        # The updater works on host float32 arrays. On the CPU those are the
        # model's own arrays (updated in place); on a GPU a host mirror of the
        # learned parameters, copied back after each update.
        if self.device.name == "cpu":
            self._host = self.model.params
        else:
            self._host = {k: self.device.to_host(v).copy() for k, v in self.model.params.items()}
        host_arrays = dict(self._host)
        for k, v in self.model.stats.items():
            host_arrays[k] = v if self.device.name == "cpu" else self.device.to_host(v).copy()
        self.updater = update if hasattr(update, "apply") else update(host_arrays, self.model.nonlearned_names(),
                                                                      spec["optimizer"])

    def _step(self, t: int) -> tuple[float, float, int]:
        x, y = self._batches(t)
        x, y = self.xp.asarray(x), self.xp.asarray(y)
        loss, acc = accumulate_gradients(self.model, x, y, self.micro_batches)
        grads = self.model.grads
        norm = global_norm(grads)
        if self.device.name != "cpu":
            grads = {k: self.device.to_host(g) for k, g in grads.items()}
        self.updater.apply(self._host, grads, step=t, norm=norm)
        if self.device.name != "cpu":
            self.model.load(self._host)
        return float(loss), float(acc), len(x)

    def run(self) -> TrainResult:
        """Train for the job's steps (or until target_accuracy); evaluate every
        eval_every steps (0: once per epoch) and at the end."""
        start = time.perf_counter()
        train_s = 0.0
        examples = 0
        history: list[dict] = []
        test_loss = test_acc = float("nan")
        loss = float("nan")
        stopped = "steps"
        steps_done = 0
        for t in range(self.total_steps):
            t0 = time.perf_counter()
            loss, acc, k = self._step(t)
            train_s += time.perf_counter() - t0
            examples += k
            steps_done = t + 1
            row = {"step": steps_done, "total": self.total_steps, "epoch": t // self.steps_per_epoch,
                   "loss": loss, "accuracy": acc,
                   "examples_per_s": examples / train_s if train_s > 0 else 0.0,
                   "wall_s": time.perf_counter() - start}
            diverged = not math.isfinite(loss)
            if diverged or steps_done % self.eval_every == 0 or steps_done == self.total_steps:
                test_loss, test_acc = evaluate(self.model, self.test_set, xp=self.xp)
                row["test_loss"], row["test_accuracy"] = test_loss, test_acc
                row["wall_s"] = time.perf_counter() - start
                if diverged:
                    stopped = "diverged"
                elif self.target_accuracy is not None and test_acc >= self.target_accuracy:
                    stopped = "target"
            history.append(row)
            if self.progress is not None:
                self.progress(row)
            if stopped != "steps":
                break
        self.device.synchronize()
        wall = time.perf_counter() - start
        return TrainResult(test_accuracy=test_acc, test_loss=test_loss, final_loss=loss, steps=steps_done,
                           wall_s=wall, examples_per_s=examples / train_s if train_s > 0 else 0.0,
                           history=history, stopped=stopped)
