"""One assignment of a worker: train the data partitions it holds, or evaluate a job's final parameters.

Training loop (README.md, "Architecture"): the worker holds one or
more of the job's partitions; each step it takes those at the lowest step
t, computes each one's minibatch gradient from the same parameters
(worker/step.py), and pushes their mean as step t of each with one
push_pull, which brings back the parameters for step t + 1. Partitions
that come to it behind the others (taken over from a worker that died)
catch up alone until they are level. It holds nothing that must survive
it: where each partition stands is the shards' clock table, read at every
(re)start, so a partition resumes at its next step, never skipping one.

Between steps (a step boundary) it does what the scheduler asked through
heartbeat replies: gives partitions back (`release`) for a worker that
joined, takes on partitions it was given (after a REASSIGNED refusal or a
heartbeat naming more), reports partitions that did all their steps, and
leaves when told to stop.

The first worker of a job initialises it: it builds the model from the
job's seed, reports the model's tensors and the training set's size,
gets the partition plan and the steps each partition owes, and creates
the tables on the shards with the seeded initial values.

Failure is a result: a non-finite loss or gradient, a model over the
scheduler's size limit or data that cannot be read fails the job at once
(a `fatal` report); any other exception, MemoryError included, is
reported as a failure of the partitions held, and the worker goes on to
its next assignment.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from protocol.assignment import EVAL, Assignment
from protocol.errors import ErrorCode
from protocol.messages import Assign, Report
from protocol.partitions import steps_owed
from protocol.plan import Plan
from worker.client import ParamClient, ShardError, piece_bound
from worker.data import DataError, load_dataset, worker_batches
from worker.sched_client import SchedulerError, SchedulerUnavailable
from worker.step import Diverged, partitions_step
from worker.trainer import evaluate

log = logging.getLogger("pscluster.worker")

# Evaluate at most this often (in steps) when the job says "every epoch" and
# epochs are tiny: evaluation of the test split must not dominate training.
MIN_EVAL_INTERVAL_STEPS = 10
# How long the scheduler may hold a request for this worker's partitions.
SYNC_WAIT_S = 10.0
# Reports the scheduler must answer: a short wait, a few tries.
REPORT_TIMEOUT_S, REPORT_RETRIES = 10.0, 3
# Bytes per value the servers hold (float32).
VALUE_BYTES = 4


class Leave(Exception):
    """The worker leaves the job: told to stop, or no partition left to it. Not a failure."""


class Fatal(Exception):
    """The job cannot succeed (diverged, model too large, data unreadable): it fails at once."""


@dataclass
class Outcome:
    """How an assignment ended: done | stopped | failed, and why."""

    status: str
    detail: str = ""


@dataclass
class Holding:
    """One partition this worker holds."""

    index: int
    owed: int              # steps the partition owes in all
    batches: object        # its Batches
    start: int | None = None  # the step this worker took it over at (None: not read yet)
    step: int = 0          # steps completed
    loss: float | None = None
    accuracy: float | None = None


@dataclass
class _Pending:
    """A step whose last pieces are sent and whose next parameters are still arriving."""

    stream: object         # its StepStream (worker/client.py)
    parts: list[int]
    result: object         # its StepResult (worker/step.py)
    t0: float
    base: list[int]        # the shards' versions its gradient was computed from
    before: dict           # partition -> (step, loss, accuracy) before it was booked


class DataCache:
    """Datasets by (source, seed, test_fraction): a worker loads each once.

    `roots` are the worker's data roots (--data-root): idx: and npz: paths
    outside them fail the job with a DataError (fatal) before any file is
    opened; the default, no roots, allows only the built-in sources.
    """

    def __init__(self, roots: tuple[str, ...] = ()):
        self.roots = tuple(roots)
        self._sets: dict[tuple, tuple] = {}

    def get(self, data_spec: dict, seed: int):
        key = (data_spec["source"], seed, data_spec["test_fraction"])
        if key not in self._sets:
            self._sets.clear()  # keep one: datasets can be large
            self._sets[key] = load_dataset(data_spec, seed=seed, roots=self.roots)
        return self._sets[key]


class Task:
    """Runs one assignment to its end. `run()` blocks; it raises nothing the daemon must handle.

    `next_assignment` is set when the scheduler answered a question about
    this job with work elsewhere: the daemon runs that next.
    """

    def __init__(self, assignment: Assignment, *, worker: str, device, sched, heartbeat, ctx, data: DataCache,
                 slowdown: float = 1.0, metrics=None, keys=None):
        self.a = assignment
        self.job = assignment.job
        self.spec = assignment.spec
        self.worker = worker
        self.device = device
        self.sched = sched
        self.heartbeat = heartbeat
        self.ctx = ctx
        self.data = data
        self.slowdown = max(1.0, slowdown)
        self.metrics = metrics
        self.keys = keys  # CURVE: this worker's pair (WorkerKeys), None without
        self.client: ParamClient | None = None
        self.next_assignment: Assignment | None = None
        self.held: dict[int, Holding] = {}
        self.epoch = assignment.epoch
        self.owed: list[int] = list(assignment.steps)
        self.max_stale = 0
        self._fresh = False
        self._pending: _Pending | None = None   # the step in flight (overlap: worker/task.py, _step)
        self._model = self._hostarrays = None
        self._order: list[str] | None = None    # the model's arrays in forward order: pulled in that order

    # --- entry ---

    def run(self) -> Outcome:
        try:
            if self.a.task == EVAL:
                return self._evaluate_final()
            return self._train()
        except Leave as exc:
            outcome, event = Outcome("stopped", str(exc)), "stopped"
        except (Diverged, Fatal, DataError) as exc:
            outcome, event = Outcome("failed", str(exc)), "fatal"
        except ShardError as exc:
            if exc.code is ErrorCode.NOT_MEMBER:
                # Removed from the membership (the job stopped, or this worker was
                # declared dead while stalled): not this job's failure, just leave it.
                outcome, event = Outcome("stopped", str(exc)), "stopped"
            elif exc.code is ErrorCode.TOO_LARGE:
                # The same request would be refused again wherever it ran: the job fails, no retry loop.
                outcome, event = Outcome("failed", f"{exc} (a slice over the shards' --max-message-bytes: "
                                                   "lower the job's partition_bytes)"), "fatal"
            elif exc.code is ErrorCode.UNKNOWN_JOB:
                outcome, event = Outcome("failed", f"{exc} (the shard lost the job's parameters; run servers "
                                                   "with --checkpoint-dir to survive restarts)"), "failed"
            else:
                outcome, event = Outcome("failed", str(exc)), "failed"
        except (SchedulerError, SchedulerUnavailable) as exc:
            outcome, event = Outcome("stopped", f"lost the scheduler: {exc}"), "stopped"
        except Exception as exc:  # MemoryError and any bug: the job's failure, not the worker's end
            log.exception("assignment failed", extra={"job": self.job})
            outcome, event = Outcome("failed", f"{type(exc).__name__}: {exc}"[:400]), "failed"
        finally:
            self._abandon()  # a step still in flight did not count: its partitions report where they stood
            # The model goes with the assignment: the daemon holds this Task while it builds the next one.
            self._model = self._hostarrays = None
            if self.client is not None:
                self.client.close()
        self._final_report(event, outcome)
        return outcome

    def _final_report(self, event: str, outcome: Outcome) -> None:
        state = {"parts": self._parts_state()}
        if event == "stopped":
            name = "stopped"
        else:
            name = "failed"
            state.update(error=outcome.detail, fatal=event == "fatal")
        try:
            self._report(name, state)
        except (SchedulerError, SchedulerUnavailable) as exc:  # the scheduler notices the silence instead
            log.warning("could not report", extra={"job": self.job, "why": str(exc)})

    # --- talking to the scheduler ---

    def _report(self, event: str, state: dict) -> dict:
        reply = self.sched.request(Report(job=self.job, event=event, state=state), timeout_s=REPORT_TIMEOUT_S,
                                   retries=REPORT_RETRIES)
        if reply.body.get("stop"):
            self.heartbeat.stop_requested.set()
        return reply.body

    def _parts_state(self, only=None) -> dict:
        return {str(k): {"from": h.start, "step": h.step, "loss": h.loss, "accuracy": h.accuracy,
                         "max_staleness": self.max_stale}
                for k, h in self.held.items() if only is None or k in only}

    # --- building ---

    def _build(self):
        from worker.nn.model import build_model, count_values

        seed = int(self.spec["seed"])
        train, test = self.data.get(self.spec["data"], seed)
        nbytes = count_values(self.spec["model"], train.input_shape, train.num_classes) * VALUE_BYTES
        if self.a.max_model_bytes and nbytes > self.a.max_model_bytes:
            raise Fatal(f"the model has {nbytes:,} bytes of parameters, over the scheduler's limit of "
                        f"{self.a.max_model_bytes:,} (--max-model-bytes)")
        model = build_model(self.spec["model"], train.input_shape, train.num_classes, seed=seed, xp=self.device.xp)
        return model, train, test

    def _host_arrays(self, model) -> dict[str, np.ndarray]:
        """Host float32 arrays the client pulls into: the model's own on the CPU."""
        if self.device.name == "cpu":
            return model.arrays()
        return {k: self.device.to_host(v).copy() for k, v in model.arrays().items()}

    def _initial_values(self, host: dict) -> None:
        """`init_from: file:PATH`: the tables start from an export file's tensors (read under this worker's
        data roots, as data files are) instead of the seeded values. (`job:ID` needs nothing here: the
        shards copy that job's table when they create this one, and ignore this load.)"""
        source = self.spec.get("init_from") or ""
        if not source.startswith("file:"):
            return
        from worker.data.roots import PathGuard
        from worker.export_file import ExportFileError, check_tensors, read_export

        try:
            path = str(PathGuard(f"init_from {source}", self.data.roots).resolve(source[len("file:"):]))
            _spec, tensors, _meta = read_export(path)
            check_tensors(path, {n: (a.shape, a.dtype.name) for n, a in host.items()}, tensors)
        except (DataError, ExportFileError) as exc:
            raise Fatal(f"init_from: {exc}") from None
        for name, arr in host.items():
            arr[...] = tensors[name]
        log.info("initial values from a file", extra={"job": self.job, "path": path})

    def _load(self, model, host: dict) -> None:
        if self.device.name != "cpu":
            model.load(host)

    def _plan(self, model, train) -> Plan:
        shapes = model.param_shapes()
        tensors = [[name, list(shape), dtype] for name, (shape, dtype) in sorted(shapes.items())]
        if self.a.init:
            body = self._report("plan", {"tensors": tensors, "nonlearned": model.nonlearned_names(),
                                         "train_size": len(train)})
            if body.get("stop") or "plan" not in body:
                raise Leave("the scheduler stopped the job at its plan")
            plan = Plan.from_wire(body["plan"])
            self.owed = list(body.get("steps") or [])
        else:
            plan = Plan.from_wire(self.a.plan)
        mine = {name: (tuple(shape), dtype) for name, shape, dtype in tensors}
        theirs = {t.name: (t.shape, t.dtype) for t in plan.tensors}
        if mine != theirs:
            raise Fatal(f"job {self.job}: this worker's model has other tensors than the job's plan")
        if len(self.owed) != self.a.num_partitions:
            self.owed = steps_owed(self.spec, len(train), self.a.num_partitions)
        return plan

    def _client(self, plan: Plan) -> ParamClient:
        self.client = ParamClient(self.a.shards, plan, job=self.job, worker=self.worker, ctx=self.ctx,
                                  timeout_s=10.0, retries=3,
                                  resolve=lambda: self.heartbeat.shard_addresses(self.job),
                                  curve=self.keys.pair if self.keys else None, shard_keys=self.a.shard_keys,
                                  compression=self.spec.get("compression"),
                                  piece_bytes=piece_bound(self.a.max_message_bytes))
        return self.client

    # --- partitions held ---

    def _hold(self, indices, train) -> None:
        """Hold exactly `indices` from now on (new ones start where the shards say, at the next sync)."""
        seed, batch_size = int(self.spec["seed"]), int(self.spec["data"]["batch_size"])
        for k in list(self.held):
            if k not in indices:
                del self.held[k]
        for k in indices:
            if k not in self.held:
                batches = worker_batches(train, k=k, num=self.a.num_partitions, batch_size=batch_size, seed=seed)
                self.held[k] = Holding(k, self.owed[k], batches)

    def _read_steps(self, client: ParamClient, host: dict, model) -> None:
        """Where every held partition stands: the least step any shard's clock table gives it."""
        self._abandon()
        client.pull(clock=-1, out=host)
        steps = client.part_steps()
        missing = [k for k in self.held if k not in steps]
        if missing:
            raise Leave(f"the shards do not list partition {missing[0]} as this worker's")
        for k, h in self.held.items():
            h.step = steps[k]
            if h.start is None:
                h.start = steps[k]
        self._fresh = False

    def _sync(self, client: ParamClient, host: dict, model, train) -> None:
        """Ask the scheduler which partitions this worker holds now, then read where they stand."""
        reply = self.sched.request(Assign(job=self.job, wait_s=SYNC_WAIT_S), timeout_s=SYNC_WAIT_S + 5.0,
                                   retries=2)
        body = reply.body
        if not body.get("task"):
            raise Leave("the scheduler has no partition of this job for this worker any more")
        assignment = Assignment.from_wire(body)
        if assignment.job != self.job or assignment.task == EVAL:
            self.next_assignment = assignment
            raise Leave(f"moved on to {assignment.task} of job {assignment.job}")
        self.epoch = assignment.epoch
        self._hold(assignment.partitions, train)
        self._read_steps(client, host, model)

    def _boundary(self, client: ParamClient, host: dict, model, train) -> None:
        """Between two steps: report finished partitions, give back what was asked, take on what was given."""
        if self._must_settle():
            self._settle()
        finished = [k for k, h in self.held.items() if h.step >= h.owed]
        if finished:
            view = self._report("done", {"parts": self._parts_state(finished)})
            for k in finished:
                del self.held[k]
            self.epoch = max(self.epoch, view.get("latest", 0))  # older heartbeat views still list them
            if not self.held:
                return  # every partition it held is done: the assignment is
            self._apply(view, client, host, model, train)
        if self.heartbeat.stop_requested.is_set():
            raise Leave("told to stop")
        view = self.heartbeat.view(self.job)
        if view is not None and view.get("epoch", 0) >= self.epoch:
            self._apply(view, client, host, model, train)

    def _apply(self, view: dict, client, host, model, train) -> None:
        release = [k for k in view.get("release", []) if k in self.held]
        if release:
            log.info("releasing partitions", extra={"job": self.job, "partitions": ",".join(map(str, release))})
            view = self._report("release", {"release": release, "parts": self._parts_state(release)})
            for k in release:
                del self.held[k]
            self.epoch = max(self.epoch, view.get("latest", 0))
        if view.get("stop"):
            raise Leave("told to stop")
        given = view.get("partitions")
        if isinstance(given, list) and set(given) - set(self.held) and view.get("epoch", 0) >= self.epoch:
            self._sync(client, host, model, train)

    # --- training ---

    def _train(self) -> Outcome:
        model, train, test = self._build()
        plan = self._plan(model, train)
        client = self._client(plan)
        host = self._host_arrays(model)
        self._model, self._hostarrays, self._order = model, host, list(host)
        if self.a.init:
            self._initial_values(host)
            client.load(host)  # the scheduler created the tables when it answered the plan
            log.info("tables loaded", extra={"job": self.job, "slices": len(plan.slices)})
            view = self._report("initialized", {})
            self._hold(self.a.partitions, train)
            self._read_steps(client, host, model)
            self._apply(view, client, host, model, train)
        else:
            self._hold(self.a.partitions, train)
            self._read_steps(client, host, model)
        eval_every = int(self.spec.get("eval_every") or 0) or max(
            MIN_EVAL_INTERVAL_STEPS, next(iter(self.held.values())).batches.steps_per_epoch if self.held else 1)
        log.info("training", extra={"job": self.job, "partitions": ",".join(map(str, sorted(self.held)))})
        while True:
            self._boundary(client, host, model, train)
            if not self.held:
                return Outcome("done")
            step = min(h.step for h in self.held.values())
            parts = sorted(k for k, h in self.held.items() if h.step == step)
            try:
                self._step(client, model, host, parts, step)
            except ShardError as exc:
                if exc.code is not ErrorCode.REASSIGNED:
                    raise
                self._sync(client, host, model, train)  # given more partitions: the barrier needs them
                continue
            if 0 in parts and ((step + 1) % eval_every == 0 or step + 1 == self.held[0].owed):
                self._settle()
                test_loss, test_acc = evaluate(model, test, xp=self.device.xp)
                if self.metrics is not None:
                    self.metrics.set("test_accuracy", test_acc, job_id=self.job)
                self._report("eval", {"step": step + 1, "test_accuracy": test_acc, "test_loss": test_loss})

    def _step(self, client: ParamClient, model, host: dict, parts: list[int], step: int) -> None:
        """Step `step` of `parts`: gradients pushed as they are made, the parameters for the next step.

        Overlap (the job's `overlap`, on by default; not with clipping, whose
        scale needs the whole gradient's norm first; and only where a shard's
        share takes more than one message, else there is nothing to send
        early and the hooks would only cost time): each layer's gradient
        goes out as soon as its backward is done, last layer first, while
        the earlier layers compute; then the step ends without waiting for
        the next step's parameters, and the next step's forward waits for
        each layer's own (`_Pending`), first layer first, while the rest
        are still on the way.
        """
        pending = self._pending
        if pending is None and not self._fresh:
            client.pull(clock=step, out=host)
            self._load(model, host)
            self._fresh = True
        clip_norm = float(self.spec["optimizer"]["clip_norm"])
        # Nothing to overlap where each shard's share is one message: the step goes out whole.
        overlap = bool(self.spec.get("overlap", True)) and clip_norm <= 0 and client.in_pieces
        cpu = self.device.name == "cpu"
        # The forward may start before the parameters are all in only where it reads them in place.
        early = overlap and pending is not None and cpu and not model.stats
        if pending is not None and not early:
            self._settle()
        t0 = time.perf_counter()
        box: dict = {"comm": 0.0}  # seconds in the hooks below: communication, which `slowdown` skips

        def wait_for(names: list[str]) -> None:
            t = time.perf_counter()
            pending.stream.wait_for(names)
            box["comm"] += time.perf_counter() - t

        def send(grads: dict) -> None:
            t = time.perf_counter()
            if "stream" not in box:  # the backward started: the forward read every parameter
                self._settle()
                box["base"] = list(client.versions)
                box["stream"] = client.stream(clock=step, norm=-1.0, parts=parts, out=host, names=self._order)
            box["stream"].send(self._host(grads))
            box["comm"] += time.perf_counter() - t

        result = partitions_step(model, {k: self.held[k].batches for k in parts}, step,
                                 micro_batches=int(self.spec["data"].get("micro_batches", 1)),
                                 clip_norm=clip_norm, seed=int(self.spec["seed"]), xp=self.device.xp,
                                 on_layer=send if overlap else None, defer=cpu,
                                 before_layer=wait_for if early else None)
        self._settle()
        if self.slowdown > 1.0:
            # Experiments only: this worker computes `slowdown` times slower
            # (a straggler). The round trip is not scaled: it may hold time
            # a policy made us wait, and slowed workers waiting on each other
            # would compound step after step.
            time.sleep(max(0.0, time.perf_counter() - t0 - box["comm"]) * (self.slowdown - 1.0))
        stream = box.get("stream")
        base = box.get("base") or list(client.versions)
        if stream is None:
            stream = client.stream(clock=step, norm=result.norm, parts=parts, out=host,
                                   names=self._order if overlap else None)
        grads = {**result.grads, **result.deltas}
        stream.send(self._host({k: v for k, v in grads.items() if k not in stream.sent}))
        self._fresh = False
        stream.finish(wait=False)
        before = {}
        for k in parts:  # booked now (the next step's number); undone if the step never counts
            h = self.held[k]
            before[k] = (h.step, h.loss, h.accuracy)
            h.step, h.loss, h.accuracy = step + 1, result.losses[k], result.accuracies[k]
        self._pending = _Pending(stream, parts, result, t0, base, before)
        if not overlap:
            self._settle()

    def _settle(self) -> None:
        """Take every reply of the step in flight: the parameters are the next step's, and the step counts."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        client = self.client
        pending.stream.wait()
        self._fresh = True
        # Replies carry the version they reflect: the updates that landed
        # between the pull this gradient came from and its own update.
        stale = max(0, max(after - before - 1 for before, after in zip(pending.base, client.versions)))
        self.max_stale = max(self.max_stale, stale)
        self._load(self._model, self._hostarrays)
        self.heartbeat.report(self.job, {"parts": self._parts_state()})
        self._observe(time.perf_counter() - pending.t0, pending.result.examples, pending.result, stale)

    def _abandon(self) -> None:
        """The step in flight will not be waited for (an error, a re-read): its booking is undone."""
        pending, self._pending = self._pending, None
        if pending is not None:
            for k, (step, loss, acc) in pending.before.items():
                if k in self.held:
                    self.held[k].step, self.held[k].loss, self.held[k].accuracy = step, loss, acc

    def _must_settle(self) -> bool:
        """Whether the boundary acts on this worker's partitions (then the step in flight must count first)."""
        if self._pending is None:
            return False
        if any(h.step >= h.owed for h in self.held.values()) or self.heartbeat.stop_requested.is_set():
            return True
        view = self.heartbeat.view(self.job)
        return view is not None and view.get("epoch", 0) >= self.epoch and bool(
            view.get("release") or view.get("stop") or set(view.get("partitions") or ()) - set(self.held))

    def _host(self, arrays: dict) -> dict:
        """Gradients as the client sends them: host arrays (copied off a GPU)."""
        if self.device.name == "cpu":
            return arrays
        return {k: self.device.to_host(v) for k, v in arrays.items()}

    def _observe(self, step_s: float, examples: int, result, stale: int) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        loss = sum(result.losses.values()) / len(result.losses)
        acc = sum(result.accuracies.values()) / len(result.accuracies)
        m.inc("steps_total", len(result.losses), job_id=self.job)
        m.inc("examples_total", examples, job_id=self.job)
        m.histogram("step_seconds", job_id=self.job).observe(step_s)  # buckets: protocol/metrics.py
        m.histogram("staleness_seen", job_id=self.job).observe(stale)
        m.set("loss", loss, job_id=self.job)
        m.set("accuracy", acc, job_id=self.job)
        m.set("examples_per_second", examples / max(step_s, 1e-9), job_id=self.job)

    # --- final evaluation ---

    def _evaluate_final(self) -> Outcome:
        model, train, test = self._build()
        plan = self._plan(model, train)
        host = self._host_arrays(model)
        self._client(plan).pull(clock=-1, out=host)
        self._load(model, host)
        test_loss, test_acc = evaluate(model, test, xp=self.device.xp)
        self._report("final", {"test_accuracy": test_acc, "test_loss": test_loss})
        log.info("final evaluation", extra={"job": self.job, "test_accuracy": round(test_acc, 4)})
        return Outcome("done")
