"""The single-process reference trainer, and the step pieces the worker shares.

`LocalTrainer` runs a job's model, data order and optimizer math in one
process with no sockets: what one worker of the cluster computes, with the
servers' update applied locally by an `update` object the caller passes
(`ps.optim.Updater`; worker/ never imports ps/). It is the yardstick the
cluster is checked against, and `psctl train-local`.

One step is the cluster worker's own (worker/step.py, `partitions_step`)
as partition 0 of 1: batch(t) -> gradients over data.micro_batches ->
finiteness and norm -> update.apply(params, grads and running-statistics
deltas, step=t, norm=norm), what a shard applies.
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
from worker.step import Diverged, partitions_step

EVAL_BATCH = 512


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


class _StepBatches:
    """A callable step -> (x, y) as the `.batch(step)` object a step takes."""

    def __init__(self, fn: Callable[[int], tuple[np.ndarray, np.ndarray]]):
        self.batch = fn


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
        self.seed = seed
        self._batches = (worker_batches(self.train_set, k=0, num=1, batch_size=self.batch_size, seed=seed)
                         if batches is None else _StepBatches(batches))
        self.steps_per_epoch = math.ceil(len(self.train_set) / self.batch_size)
        self.total_steps = total_steps(spec, len(self.train_set))
        # A cosine schedule of an `epochs:` job decays over the steps just counted.
        self.spec = spec = {**spec, "optimizer": schedule_length(spec, [self.total_steps])}
        self.eval_every = int(spec.get("eval_every") or 0) or self.steps_per_epoch
        self.target_accuracy = spec.get("target_accuracy")
        self.progress = progress
        # The updater works on host float32 arrays, as a shard does. On the
        # CPU those are the model's own arrays (updated in place); on a GPU a
        # host mirror, copied back after each update.
        if self.device.name == "cpu":
            self._host = self.model.arrays()
        else:
            self._host = {k: self.device.to_host(v).copy() for k, v in self.model.arrays().items()}
        self.updater = update if hasattr(update, "apply") else update(dict(self._host),
                                                                      self.model.nonlearned_names(),
                                                                      spec["optimizer"])

    def _step(self, t: int) -> tuple[float, float, int]:
        """One step: the cluster worker's step (worker/step.py) as partition 0 of 1, then the shard's update.

        A non-finite loss or gradient is not applied: the step reports a NaN loss and run() stops there.
        """
        try:
            result = partitions_step(self.model, {0: self._batches}, t, micro_batches=self.micro_batches,
                                     clip_norm=float(self.spec["optimizer"]["clip_norm"]), seed=self.seed,
                                     xp=self.xp)
        except Diverged:
            return float("nan"), float("nan"), self.batch_size
        grads = {**result.grads, **result.deltas}  # running statistics travel as deltas, as to a shard
        if self.device.name != "cpu":
            grads = {k: self.device.to_host(g) for k, g in grads.items()}
        self.updater.apply(self._host, grads, step=t, norm=result.norm)
        if self.device.name != "cpu":
            self.model.load(self._host)
        return result.losses[0], result.accuracies[0], result.examples

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
