"""A job as the scheduler keeps it: its durable record, and while it runs,
its partitions, who holds them, and what they did. Pure state.

A job is `workers` data partitions times the steps each owes. Partitions
are the unit of work; workers are interchangeable hands that hold one or
more partitions at a time. Every partition keeps the list of its holders
with the steps each one trained (`Segment`), so "which partition trained
which steps" is a record, not a guess, and every figure shown to a user
(steps, examples, examples/s) is summed from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from protocol.jobstate import JobState
from protocol.partitions import partition_key
from protocol.plan import Plan

# A job only moves forward: queued -> running -> one final state (protocol/jobstate.py).
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED,
                                                  JobState.FAILED, JobState.CANCELLED)
# Progress samples kept per job for its loss curve (thinned by half when full).
MAX_CURVE_POINTS = 2000
# Evaluations kept per job.
MAX_HISTORY = 1000


@dataclass
class JobRecord:
    """One job as the job store keeps it (ps/registry.py)."""

    id: str
    seq: int
    name: str
    state: JobState
    spec: dict
    submitted: float
    started: float | None = None
    finished: float | None = None
    plan: dict | None = None
    shards: list = field(default_factory=list)
    tensors: list = field(default_factory=list)
    nonlearned: list = field(default_factory=list)
    progress: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)
    error: str = ""
    submission_id: str = ""

    def row(self) -> dict:
        return dict(vars(self))


@dataclass
class Segment:
    """A stretch of one partition's steps trained by one worker: steps [first, last)."""

    worker: str
    first: int
    last: int
    reported: bool = False     # the holder has reported where it started

    def wire(self) -> dict:
        return {"worker": self.worker, "first": self.first, "last": self.last}


@dataclass
class Partition:
    """One data partition of a running job."""

    index: int
    steps: int | None = None     # steps it owes; None until the data size is known (epochs jobs)
    done_steps: int = 0          # steps completed, as its holders reported them
    holder: str | None = None
    segments: list[Segment] = field(default_factory=list)
    failures: int = 0            # failures of its holders in a row (reset by progress)
    last_error: str = ""
    loss: float | None = None
    accuracy: float | None = None
    max_staleness: int = 0
    release: bool = False        # the scheduler asks its holder to give it back

    @property
    def key(self) -> str:
        return partition_key(self.index)

    @property
    def done(self) -> bool:
        return self.steps is not None and self.done_steps >= self.steps

    def examples(self, batch_size: int) -> int:
        """Examples trained into the model, summed over every holder's steps (every batch is full)."""
        return sum(max(0, s.last - s.first) for s in self.segments) * batch_size

    def wire(self, batch_size: int) -> dict:
        return {"index": self.index, "steps": self.steps, "steps_done": self.done_steps,
                "examples": self.examples(batch_size), "holder": self.holder,
                "holders": [s.wire() for s in self.segments], "failures": self.failures,
                "last_error": self.last_error, "loss": self.loss, "accuracy": self.accuracy,
                "max_staleness": self.max_staleness}


class JobRun:
    """A running job: partitions and holders, membership epochs, and how it ends."""

    def __init__(self, record: JobRecord, shards: list[str], *, epoch_base: int, now: float,
                 started_at: float | None = None):
        self.record = record
        self.job_id = record.id
        self.spec = record.spec
        self.shards = list(shards)
        self.plan = Plan.from_wire(record.plan) if record.plan else None
        self.batch_size = int(self.spec["data"]["batch_size"])
        self.partitions = [Partition(k) for k in range(int(self.spec["workers"]))]
        if self.spec.get("steps"):
            for p in self.partitions:
                p.steps = int(self.spec["steps"])
        self.epoch = epoch_base              # the newest membership epoch (wire numbering)
        self.acked: dict[int, int] = {}      # shard index -> newest epoch it acknowledged
        self.grants: dict[str, int] = {}     # worker -> epoch its newest partitions need acked
        self.told: set[str] = set()          # workers that received their assignment
        self.joining: set[str] = set()       # workers reserved for this job, waiting for partitions
        self.init_worker: str | None = None
        self.initialized = False
        self.created: set[int] = set()       # shards that created the job's table
        self.plan_wait: tuple | None = None  # (peer, rid, worker) of the plan report answered once they all did
        self.eval_worker: str | None = None
        self.eval_failures = 0
        self.final: dict | None = None
        self.stopping = False                # target reached, cancelled or failed: no more training
        self.cancelled = False
        self.error = ""
        self.stopped_by = ""                 # target | cancel | error
        self.target_seen: float | None = None
        self.test_accuracy: float | None = None
        self.test_loss: float | None = None
        self.history: list[dict] = []
        self.curve: list[dict] = []
        self.started_at = now if started_at is None else started_at   # when it first ran (this clock)
        self.train_started: float | None = None
        self.train_before = 0.0              # training time under a previous scheduler
        self.train_ended: float | None = None
        self.rollback: dict | None = None    # under way (ps/sched/checkpoints.py)
        self.rollbacks: list[dict] = []      # done: {"at", "shard", "version", "steps_lost"}
        self.checkpoints: list[dict] = []    # complete (every shard wrote it): {"version", "at"}, oldest first
        self.instances: dict[int, str] = {}  # shard index -> the server process holding its table
        self.layout_from = -1                # checkpoints at or before this version are another plan's
        self._restore(record.progress or {})

    def _restore(self, saved: dict) -> None:
        """Pick up a job a previous scheduler ran: its partitions' steps, holders' segments, training time.

        The record comes from disk: anything malformed in it is left out, never raised.
        """
        items = saved.get("partitions")
        for item in items if isinstance(items, list) else []:
            k = item.get("index") if isinstance(item, dict) else None
            if not _count(k) or k >= len(self.partitions):
                continue
            p = self.partitions[k]
            if _count(item.get("steps")) and item["steps"] >= 1:
                p.steps = item["steps"]
            if _count(item.get("steps_done")):
                p.done_steps = item["steps_done"]
            holders = item.get("holders")
            p.segments = [Segment(str(s.get("worker") or ""), s["first"], s["last"], True)
                          for s in (holders if isinstance(holders, list) else [])
                          if isinstance(s, dict) and _count(s.get("first")) and _count(s.get("last"))]
        for name in ("rollbacks", "checkpoints"):
            kept = saved.get(name)
            setattr(self, name, [x for x in kept if isinstance(x, dict) and _count(x.get("version"))][-MAX_HISTORY:]
                    if isinstance(kept, list) else [])
        layout = saved.get("layout_from")
        self.layout_from = layout if _count(layout) else -1
        instances = saved.get("instances")
        self.instances = ({int(k): str(v) for k, v in instances.items() if str(k).isdigit()}
                          if isinstance(instances, dict) else {})
        summary = saved.get("summary")
        before = summary.get("train_s") if isinstance(summary, dict) else None
        self.train_before = float(before) if isinstance(before, (int, float)) and before >= 0 else 0.0
        for name, limit in (("history", MAX_HISTORY), ("curve", MAX_CURVE_POINTS)):
            kept = saved.get("evals" if name == "history" else name)
            setattr(self, name, [x for x in kept if isinstance(x, dict)][-limit:] if isinstance(kept, list) else [])

    # --- who holds what ---

    def active(self) -> list[Partition]:
        """Partitions with steps left."""
        return [p for p in self.partitions if not p.done]

    def held_by(self, worker: str) -> list[int]:
        return [p.index for p in self.partitions if p.holder == worker]

    def holders(self) -> list[str]:
        """Workers holding a partition, in the order of their first partition."""
        seen: dict[str, None] = {}
        for p in self.partitions:
            if p.holder is not None:
                seen.setdefault(p.holder, None)
        return list(seen)

    def grant(self, worker: str, indices: list[int]) -> None:
        """`worker` holds these partitions from the next epoch on."""
        for k in indices:
            p = self.partitions[k]
            p.holder, p.release = worker, False
            p.segments.append(Segment(worker, p.done_steps, p.done_steps))
        self.epoch += 1
        self.grants[worker] = self.epoch
        self.joining.discard(worker)
        self.told.discard(worker)

    def ungrant(self, indices: list[int], *, reached: dict[int, int] | None = None) -> None:
        """These partitions have no holder from the next epoch on.

        reached: the steps each had completed when its holder let it go (a
        release at a step boundary says so; a death does not).
        """
        for k in indices:
            p = self.partitions[k]
            step = (reached or {}).get(k)
            if step is not None and p.segments and p.segments[-1].worker == p.holder:
                self._advance(p, p.segments[-1], step)
            p.holder, p.release = None, False
        self.epoch += 1

    def progress(self, worker: str, parts: dict[int, dict]) -> bool:
        """A holder's report of where its partitions stand; True if a partition moved.

        Reports about partitions the worker does not hold are ignored: a
        report counts only from the partition's holder.
        """
        moved = False
        for k, state in parts.items():
            if not 0 <= k < len(self.partitions):
                continue
            p = self.partitions[k]
            if p.holder != worker or not p.segments:
                continue
            seg = p.segments[-1]
            if not seg.reported and state.get("from") is not None:
                self._start_segment(p, seg, state["from"])
            if state.get("step") is not None:
                moved |= self._advance(p, seg, state["step"])
            for name in ("loss", "accuracy"):
                if state.get(name) is not None:
                    setattr(p, name, state[name])
            if state.get("max_staleness") is not None:
                p.max_staleness = max(p.max_staleness, state["max_staleness"])
        return moved

    def _start_segment(self, p: Partition, seg: Segment, first: int) -> None:
        """The holder started at `first` (the shards' clock). Steps between the
        previous holder's last report and `first` were that holder's."""
        seg.reported = True
        if first > seg.first:
            before = p.segments[-2] if len(p.segments) >= 2 else None
            if before is not None and before.last == seg.first:
                before.last = first
            else:
                p.segments.insert(len(p.segments) - 1, Segment("", seg.first, first, True))
        seg.first = seg.last = first
        p.done_steps = max(p.done_steps, first)

    def _advance(self, p: Partition, seg: Segment, step: int) -> bool:
        if p.steps is not None:
            step = min(step, p.steps)
        if step <= seg.last:
            return False
        seg.last = step
        if step > p.done_steps:
            p.done_steps = step
            p.failures = 0
            return True
        return False

    def roll_back(self, steps: dict[int, int]) -> int:
        """Every partition goes back to the step a checkpoint holds (`steps`: index -> step, missing:
        unchanged); what was trained after it is no longer in the model, and its holders' segments
        end there. Returns the steps lost."""
        lost = 0
        for p in self.partitions:
            back = min(steps.get(p.index, p.done_steps), p.done_steps)
            lost += p.done_steps - back
            p.done_steps = back
            p.segments = [s for s in p.segments if s.first < back]
            for seg in p.segments:
                seg.last = min(seg.last, back)
            p.failures, p.holder, p.release = 0, None, False
        self.epoch += 1
        self.train_ended = None
        return lost

    def members(self) -> tuple[dict, dict]:
        """(start clocks, holders) for the shards: every partition with steps left.

        Empty once the job is stopping: the shards then refuse every push,
        so the parameters stay as they were when the job was told to stop.
        """
        if self.stopping:
            return {}, {}
        active = self.active()
        return {p.key: -1 for p in active}, {p.key: p.holder or "" for p in active}

    def readers(self) -> list[str]:
        """Workers that may read the parameters without holding a partition: the one evaluating."""
        return [self.eval_worker] if self.eval_worker else []

    def acked_epoch(self) -> int:
        """The newest epoch every shard of the job acknowledged."""
        return min((self.acked.get(k, 0) for k in range(len(self.shards))), default=0)

    def ready(self, worker: str) -> bool:
        """Every shard knows `worker` holds what it was granted: it may push for it."""
        return self.acked_epoch() >= self.grants.get(worker, 0)

    # --- where it stands ---

    def training_finished(self) -> bool:
        """No partition will train any more."""
        if self.stopping:
            return all(p.holder is None for p in self.partitions)
        return all(p.done for p in self.partitions)

    def examples(self) -> int:
        return sum(p.examples(self.batch_size) for p in self.partitions)

    def train_seconds(self, now: float) -> float:
        """Training time: from the tables' creation to the last partition's last step (before a
        scheduler restart too)."""
        if self.train_started is None:
            return self.train_before
        return self.train_before + max(0.0, (self.train_ended if self.train_ended is not None else now)
                                       - self.train_started)

    def summary(self, now: float) -> dict:
        """Where the job stands, for status, list and the progress bar."""
        parts = self.partitions
        losses = [p.loss for p in parts if p.loss is not None and math.isfinite(p.loss)]
        accs = [p.accuracy for p in parts if p.accuracy is not None]
        owed = [p.steps for p in parts]
        known = all(s is not None for s in owed)
        slowest = min(parts, key=lambda p: (p.done_steps / p.steps) if p.steps else 0.0)
        train_s = self.train_seconds(now)
        examples = self.examples()
        return {
            "steps_done": sum(p.done_steps for p in parts),
            "steps_asked": sum(owed) if known else None,
            "slowest": {"partition": slowest.index, "steps_done": slowest.done_steps, "steps": slowest.steps},
            "loss": sum(losses) / len(losses) if losses else None,
            "accuracy": sum(accs) / len(accs) if accs else None,
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            "examples": examples,
            "train_s": train_s,
            "examples_per_s": examples / train_s if train_s > 0 else 0.0,
            "workers": len(self.holders()),
            "partitions": len(parts),
            "max_staleness": max((p.max_staleness for p in parts), default=0),
            "epoch": self.epoch,
            "stopping": self.stopping,
            "rolling_back": self.rollback is not None,
            "rollbacks": len(self.rollbacks),
            "checkpoint": self.checkpoints[-1]["version"] if self.checkpoints else None,
        }

    def sample(self, now: float) -> None:
        """Record where the job stands for its loss curve."""
        prog = self.summary(now)
        if prog["loss"] is None:
            return
        self.curve.append({"t": round(now - self.started_at, 3), "steps_done": prog["steps_done"],
                           "loss": prog["loss"], "accuracy": prog["accuracy"],
                           "test_accuracy": prog["test_accuracy"], "examples_per_s": prog["examples_per_s"]})
        if len(self.curve) > MAX_CURVE_POINTS:
            self.curve = self.curve[::2]

    def progress_record(self, now: float) -> dict:
        """What the job store keeps of a running job (and a finished one's last word)."""
        return {"partitions": [p.wire(self.batch_size) for p in self.partitions],
                "summary": self.summary(now), "curve": self.curve, "evals": self.history[-MAX_HISTORY:],
                "rollbacks": self.rollbacks, "checkpoints": self.checkpoints[-MAX_HISTORY:],
                "instances": {str(k): v for k, v in self.instances.items()}, "layout_from": self.layout_from}

    def result(self, now: float) -> dict:
        """The job's figures, all summed from what its partitions did."""
        prog = self.summary(now)
        final = self.final or {}
        return {
            "test_accuracy": final.get("test_accuracy", self.test_accuracy),
            "test_loss": final.get("test_loss", self.test_loss),
            "final_loss": prog["loss"],
            "steps_done": prog["steps_done"],
            "steps_asked": prog["steps_asked"],
            "examples": prog["examples"],
            "train_s": prog["train_s"],
            "examples_per_s": prog["examples_per_s"],
            "wall_s": max(0.0, now - self.started_at),
            "stopped_by": self.stopped_by or "steps",
            "target_accuracy_seen": self.target_seen,
            "partitions": [p.wire(self.batch_size) for p in self.partitions],
            "rollbacks": self.rollbacks,
            "checkpoint": self.checkpoints[-1] if self.checkpoints else None,
        }


def _count(value) -> bool:
    """A non-negative int (not a bool): what a step, an index or a count read from disk must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
