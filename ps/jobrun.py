"""The scheduler's runtime view of one running job. Pure state: no sockets.

A job has `workers` data partitions. Each partition is trained by at most
one worker at a time; a partition whose worker dies is handed to the next
free worker, which picks up from the partition's last reported step (or,
under BSP, from the open barrier). The first worker to take a job
initialises it: it reports its model's tensors, gets the partition plan,
and creates the tables on the shards. When every partition is done (or the
target accuracy is reached, or the job is cancelled) one worker evaluates
the final parameters on the test split, and the job ends.

The scheduler asks this object what to do (`next_task`, `membership`) and
tells it what happened (`assigned`, `lost`, reports); it performs the I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from protocol.plan import Plan

# What a worker can be asked to do.
TRAIN, EVAL = "train", "eval"
# Progress samples kept per job (thinned by half when full).
MAX_CURVE_POINTS = 2000


@dataclass
class Partition:
    """One data partition of a job and who trains it."""

    index: int
    worker: str | None = None
    step: int = 0              # steps completed, as last reported
    total_steps: int = 0       # known once a worker computed it from the data size
    done: bool = False
    loss: float | None = None
    accuracy: float | None = None
    examples_per_s: float = 0.0
    examples: int = 0          # examples processed in this job, as last reported
    max_staleness: int = 0     # most updates by others between a pull and its push, as the worker saw


@dataclass
class JobRun:
    """A running job: its partitions, membership epoch and completion."""

    job_id: str
    spec: dict
    shards: list[str]                        # plan shard k -> address
    plan: Plan | None = None
    nonlearned: list[str] = field(default_factory=list)
    partitions: list[Partition] = field(default_factory=list)
    epoch: int = 0
    initialized: bool = False
    init_worker: str | None = None
    stopping: bool = False                   # target reached, cancelled or failed: no more training
    cancelled: bool = False
    error: str = ""
    eval_worker: str | None = None
    final: dict | None = None                # the final evaluation, once done
    stopped_by: str = ""                     # target | cancel | error, when the job stopped early
    target_seen: float | None = None         # the evaluated accuracy that met target_accuracy
    test_accuracy: float | None = None       # latest evaluation during training
    test_loss: float | None = None
    history: list[dict] = field(default_factory=list)   # evaluations during training
    curve: list[dict] = field(default_factory=list)     # progress samples over time, for plots
    started_at: float = 0.0                              # time.monotonic() when the run started

    def __post_init__(self):
        if not self.partitions:
            self.partitions = [Partition(k) for k in range(self.spec["workers"])]

    # --- who does what ---

    @property
    def policy(self) -> str:
        return self.spec["consistency"]["policy"]

    def workers(self) -> dict[str, int]:
        """Live membership: worker -> start clock for the shards (-1: the shard decides).

        Empty once the job is stopping: the shards then refuse every further
        push, so the parameters stay as they were when the job was told to
        stop (the target reached, a cancel, a failure).
        """
        if self.stopping:
            return {}
        members = {}
        for p in self.partitions:
            if p.worker is not None:
                members[p.worker] = -1 if self.policy == "bsp" else p.step
        return members

    def training_finished(self) -> bool:
        """No partition will train any more."""
        if self.stopping:
            return all(p.worker is None for p in self.partitions)
        return all(p.done for p in self.partitions)

    def next_task(self) -> tuple[str, int] | None:
        """What a free worker should do for this job: (TRAIN, partition) or (EVAL, -1), or None."""
        if self.final is not None or self.eval_worker is not None:
            return None
        if self.training_finished():
            if self.cancelled or self.error:
                return None
            return (EVAL, -1) if self.initialized else None
        if self.stopping:
            return None
        if not self.initialized and self.init_worker is not None:
            return None  # one worker initialises; the others wait for the tables
        free = self._free()
        return (TRAIN, free) if free is not None else None

    def _free(self) -> int | None:
        for p in self.partitions:
            if p.worker is None and not p.done:
                return p.index
        return None

    def assign(self, worker: str, task: tuple[str, int]) -> None:
        kind, index = task
        if kind == EVAL:
            self.eval_worker = worker
            return
        part = self.partitions[index]
        part.worker = worker
        if not self.initialized and self.init_worker is None:
            self.init_worker = worker
        self.epoch += 1

    def partition_of(self, worker: str) -> Partition | None:
        for p in self.partitions:
            if p.worker == worker:
                return p
        return None

    def lost(self, worker: str) -> bool:
        """`worker` is gone (dead or left). True when the membership changed."""
        changed = False
        part = self.partition_of(worker)
        if part is not None:
            part.worker = None
            self.epoch += 1
            changed = True
        if self.init_worker == worker and not self.initialized:
            self.init_worker = None
        if self.eval_worker == worker:
            self.eval_worker = None
        return changed

    # --- reports ---

    def progress(self, worker: str, state: dict) -> None:
        part = self.partition_of(worker)
        if part is None:
            return
        for key in ("step", "total_steps", "examples", "max_staleness"):
            if isinstance(state.get(key), int):
                setattr(part, key, state[key])
        for key in ("loss", "accuracy", "examples_per_s"):
            if isinstance(state.get(key), (int, float)):
                setattr(part, key, float(state[key]))

    def sample(self, now: float) -> None:
        """Record where the job stands (at most MAX_CURVE_POINTS, thinned evenly when full)."""
        prog = self.summary()
        if prog["loss"] is None:
            return
        self.curve.append({"t": round(now - self.started_at, 3), "step": prog["step"], "loss": prog["loss"],
                           "accuracy": prog["accuracy"], "test_accuracy": prog["test_accuracy"],
                           "examples_per_s": prog["examples_per_s"]})
        if len(self.curve) > MAX_CURVE_POINTS:
            self.curve = self.curve[::2]

    def summary(self) -> dict:
        """Aggregate progress for status and the progress bar."""
        parts = self.partitions
        steps = [p.step for p in parts]
        totals = [p.total_steps for p in parts if p.total_steps]
        losses = [p.loss for p in parts if p.loss is not None]
        accs = [p.accuracy for p in parts if p.accuracy is not None]
        return {
            "step": min(steps) if steps else 0,
            "max_step": max(steps) if steps else 0,
            "total_steps": max(totals) if totals else self.spec.get("steps") or 0,
            "loss": sum(losses) / len(losses) if losses else None,
            "accuracy": sum(accs) / len(accs) if accs else None,
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            "examples_per_s": sum(p.examples_per_s for p in parts),  # last known rate of each partition
            "examples": sum(p.examples for p in parts),
            "workers": sum(1 for p in parts if p.worker is not None),
            "max_staleness": max((p.max_staleness for p in parts), default=0),
            "partitions": len(parts),
            "epoch": self.epoch,
            "stopping": self.stopping,
        }
