"""One training step of several data partitions on one model: what a worker pushes.

A worker that holds k partitions computes, for step t, each partition's
minibatch gradient from the same parameters and pushes their mean as one
step of each partition (the push counts k times in a BSP barrier), so a
job's arithmetic does not depend on how many workers share its
partitions. Each partition's gradient is exactly what a worker of its own
would compute:

- its batch is `worker_batches(k, N).batch(t)`, a pure function of
  (partition, step);
- its dropout masks are drawn from a stream seeded by (job seed,
  partition, step), so a partition that changes hands draws the same masks;
- BatchNorm running statistics start from the pulled values for every
  partition, and their changes are averaged like the gradients;
- with gradient clipping on and k > 1, each partition's gradient is clipped
  by its own global norm here, with the formula the shards use
  (ps/optim.py, `clip_scale`), and the mean goes out with norm -1 (no more
  clipping); with one partition the norm goes to the shards, as always.

Every loss and gradient norm is checked before anything is pushed: a
non-finite one raises Diverged naming the step, the partition and the value.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# Elements per float64 chunk in global_norm: the float64 copy a chunk needs stays
# at 256 KiB, never a float64 copy of a whole gradient.
NORM_CHUNK_ELEMS = 32 * 1024
# Stream id of per-(partition, step) dropout masks under the job seed.
_DROPOUT_STEP_STREAM = 2


class Diverged(ArithmeticError):
    """A loss or gradient that is not finite; the message names the step, partition and value."""


@dataclass
class StepResult:
    """The step's gradient (the model's grads, or a buffer) and what each partition measured."""

    grads: dict[str, Any]        # mean gradient of the learned tensors
    deltas: dict[str, Any]       # mean change of the running statistics (nonlearned tensors)
    norm: float                  # what the push carries as its norm (-1: no clipping by the shards)
    losses: dict[int, float]
    accuracies: dict[int, float]
    examples: int


def global_norm(grads: Mapping[str, Any], *, skip=()) -> float:
    """L2 norm of every element of `grads` except the tensors named in `skip`.

    Accumulated in float64, chunk by chunk: the norm a worker pushes and the
    shards clip by (min(1, clip_norm / norm)).
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


def accumulate_gradients(model, x, y, micro_batches: int, *, accumulate: bool = False,
                         scale: float = 1.0, on_layer=None, defer: bool = False,
                         before_layer=None) -> tuple[float, float]:
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
        return model.train_step(x, y, accumulate=accumulate, scale=scale, on_layer=on_layer, defer=defer,
                                before_layer=before_layer)
    loss = acc = 0.0
    edges = [n * i // k for i in range(k + 1)]
    for i in range(k):
        a, b = edges[i], edges[i + 1]
        w = (b - a) / n
        li, ai = model.train_step(x[a:b], y[a:b], accumulate=accumulate or i > 0, scale=w * scale,
                                  on_layer=on_layer if i == k - 1 else None,
                                  before_layer=before_layer if i == 0 else None)
        loss += li * w
        acc += ai * w
    return loss, acc


def clip_scale(clip_norm: float, norm: float) -> float:
    """min(1, clip_norm / norm) when clipping is on: the shards' formula (ps/optim.py)."""
    if clip_norm > 0 and norm > clip_norm:
        return clip_norm / norm
    return 1.0


def dropout_seed(seed: int, partition: int, step: int) -> int:
    """The dropout stream of one partition's step: the same whoever computes it."""
    return int(np.random.SeedSequence([seed, _DROPOUT_STEP_STREAM, partition, step]).generate_state(1)[0])


def _checked(on_layer, step: int, parts: list[int], deferred: set):
    """`on_layer` behind a finiteness check: nothing that is not finite leaves the worker.
    Deferred dense gradients (RowBlocks) are named in `deferred`; their sender checks each block."""
    def hook(grads: dict) -> None:
        lazy = {name for name, g in grads.items() if not hasattr(g, "dtype")}
        deferred.update(lazy)
        norm = global_norm(grads, skip=lazy)
        if not math.isfinite(norm):
            name = next(iter(grads))
            raise Diverged(f"diverged at step {step} (partitions {', '.join(map(str, parts))}): "
                           f"gradient norm {norm} in {name.split('.')[0]}")
        on_layer({name: _CheckedRows(g, name, step, parts) if name in lazy else g for name, g in grads.items()})
    return hook


class _CheckedRows:
    """A row source (worker/nn/model.py, RowBlocks) whose every block is checked finite as it is made."""

    def __init__(self, source, name: str, step: int, parts: list[int]):
        self.source, self.name, self.step, self.parts = source, name, step, parts
        self.shape = source.shape

    def rows(self, start: int, stop: int):
        block = self.source.rows(start, stop)
        if not bool(block.size == 0 or np.isfinite(block).all()):
            raise Diverged(f"diverged at step {self.step} (partitions {', '.join(map(str, self.parts))}): "
                           f"a gradient of {self.name} (rows {start}..{stop - 1}) is not finite")
        return block


def partitions_step(model, batches: Mapping[int, Any], step: int, *, micro_batches: int, clip_norm: float,
                    seed: int, xp: Any = np, on_layer=None, defer: bool = False,
                    before_layer=None) -> StepResult:
    """Gradients of step `step` of every partition in `batches` (partition -> Batches), averaged.

    Raises Diverged before returning anything that is not finite. `on_layer`
    (Model.backward) gets each layer's final gradients as soon as they are
    done, each checked finite first (Diverged otherwise); it is not called
    when clipping is on (the shards need the whole gradient's norm first:
    the caller sends after this returns then). `defer` (one partition, one
    micro-batch): dense layers' dW go to `on_layer` as RowBlocks, made as
    they are sent, and are not in the result (Model.backward).
    `before_layer` (Model.forward) is called in the first forward only, and
    only for models without running statistics (those are copied before it).
    """
    parts = sorted(batches)
    k = len(parts)
    stats = model.stats
    before = {name: v.copy() for name, v in stats.items()} if stats else {}
    delta_sum: dict[str, Any] = {}
    grad_sum: dict[str, Any] | None = None
    clip_each = clip_norm > 0 and k > 1
    deferred: set[str] = set()    # dense dW the hook sent as row blocks: never in model.grads
    losses, accs = {}, {}
    examples = 0
    for i, p in enumerate(parts):
        x, y = batches[p].batch(step)
        examples += len(x)
        if model.has_dropout:
            model.seed_dropout(dropout_seed(seed, p, step))
        if i > 0:
            for name, v in stats.items():   # every partition normalises from the pulled statistics
                v[...] = before[name]
        accumulate = i > 0 and not clip_each
        hook = None if on_layer is None or clip_norm > 0 or i < k - 1 else _checked(on_layer, step, parts, deferred)
        loss, acc = accumulate_gradients(model, xp.asarray(x), xp.asarray(y), micro_batches,
                                         accumulate=accumulate, scale=1.0 if clip_each else 1.0 / k, on_layer=hook,
                                         defer=defer and k == 1 and hook is not None,
                                         before_layer=before_layer if i == 0 and not stats else None)
        loss = float(loss)
        if not math.isfinite(loss):
            raise Diverged(f"diverged at step {step} (partition {p}): loss {loss}")
        losses[p], accs[p] = loss, float(acc)
        if stats:
            for name, d in model.stat_deltas().items():
                delta_sum[name] = d if name not in delta_sum else delta_sum[name] + d
        if clip_each:
            norm = global_norm(model.grads)
            if not math.isfinite(norm):
                raise Diverged(f"diverged at step {step} (partition {p}): gradient norm {norm}")
            factor = clip_scale(clip_norm, norm) / k
            if grad_sum is None:
                grad_sum = {name: g * factor for name, g in model.grads.items()}
            else:
                for name, g in model.grads.items():
                    grad_sum[name] += g * factor
    if stats:
        for name, v in stats.items():
            v[...] = before[name]       # the pushed mean change is what the shards add
    grads = grad_sum if grad_sum is not None else {n: g for n, g in model.grads.items() if n not in deferred}
    deltas = {name: d / k for name, d in delta_sum.items()} if k > 1 else delta_sum
    norm = global_norm(grads)
    if not math.isfinite(norm):
        raise Diverged(f"diverged at step {step} (partitions {', '.join(map(str, parts))}): gradient norm {norm}")
    return StepResult(grads=grads, deltas=deltas, norm=norm if k == 1 else -1.0, losses=losses, accuracies=accs,
                      examples=examples)
