"""One assignment of a worker: train a data partition, or evaluate a job's final parameters.

Training loop (DESIGN.md, "Processes and sockets"): pull -> forward and
backward on this partition's minibatch -> push_pull (push step t, get the
parameters for t+1) -> report progress. The worker holds nothing that must
survive it: a replacement picks up the partition at the step the servers'
clock table gives it.

The first worker of a job initialises it: it builds the model from the
job's seed, reports the model's tensors to the scheduler, gets the
partition plan back and creates the tables on the shards with the seeded
initial values.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from protocol.errors import ErrorCode
from protocol.messages import Report
from protocol.plan import Plan
from worker.client import ParamClient, ShardError, ShardTimeout
from worker.data import DataError, load_dataset, worker_batches
from worker.trainer import accumulate_gradients, evaluate, global_norm, total_steps

log = logging.getLogger("pscluster.worker")

# Evaluate at most this often (in steps) when the job says "every epoch" and
# epochs are tiny: evaluation of the test split must not dominate training.
MIN_EVAL_INTERVAL_STEPS = 10
# Upper bounds of the step-time histogram, in seconds.
STEP_SECONDS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
# Upper bounds of the histogram of staleness this worker saw (in versions).
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


@dataclass
class Outcome:
    """How an assignment ended: done | stopped | failed, and why."""

    status: str
    detail: str = ""


class DataCache:
    """Datasets by (source, seed, test_fraction): a worker loads each once."""

    def __init__(self):
        self._sets: dict[tuple, tuple] = {}

    def get(self, data_spec: dict, seed: int):
        key = (data_spec["source"], seed, data_spec["test_fraction"])
        if key not in self._sets:
            self._sets.clear()  # keep one: datasets can be large
            self._sets[key] = load_dataset(data_spec, seed=seed)
        return self._sets[key]


class Task:
    """Runs one assignment to its end. `run()` blocks; it raises nothing the daemon must handle."""

    def __init__(self, assignment: dict, *, worker: str, device, sched, heartbeat, ctx, data: DataCache,
                 slowdown: float = 1.0, metrics=None):
        self.a = assignment
        self.job = assignment["job"]
        self.spec = assignment["spec"]
        self.worker = worker
        self.device = device
        self.sched = sched
        self.heartbeat = heartbeat
        self.ctx = ctx
        self.data = data
        self.slowdown = max(1.0, slowdown)
        self.metrics = metrics
        self.client: ParamClient | None = None

    # --- reporting ---

    def _report(self, event: str, state: dict) -> dict:
        reply = self.sched.request(Report(job=self.job, event=event, state=state), timeout_s=10.0, retries=3)
        if reply.body.get("stop"):
            self.heartbeat.stop_requested.set()
        return reply.body

    # --- entry ---

    def run(self) -> Outcome:
        try:
            if self.a["task"] == "eval":
                return self._evaluate_final()
            return self._train()
        except (DataError, ValueError) as exc:
            outcome = Outcome("failed", str(exc))
        except ShardError as exc:
            if exc.code is ErrorCode.UNKNOWN_JOB:
                # A shard restarted without a checkpoint of this job: its
                # slices are gone and no worker can bring them back.
                outcome = Outcome("failed", f"{exc} (the shard lost the job's parameters; "
                                            "run servers with --checkpoint-dir to survive restarts)")
            else:
                # Removed from the membership (declared dead while stalled):
                # not this job's failure, just leave it.
                outcome = Outcome("stopped", str(exc))
        except ShardTimeout as exc:
            outcome = Outcome("stopped", str(exc))
        finally:
            if self.client is not None:
                self.client.close()
        try:
            self._report("failed" if outcome.status == "failed" else "stopped", {"error": outcome.detail})
        except Exception as exc:  # the scheduler will notice the silence instead
            log.warning("could not report", extra={"job": self.job, "why": str(exc)})
        return outcome

    def _build(self):
        from worker.nn.model import build_model

        seed = int(self.spec["seed"])
        train, test = self.data.get(self.spec["data"], seed)
        model = build_model(self.spec["model"], train.input_shape, train.num_classes, seed=seed, xp=self.device.xp)
        return model, train, test

    def _host_arrays(self, model) -> dict[str, np.ndarray]:
        """Host float32 arrays the client pulls into: the model's own on the CPU."""
        if self.device.name == "cpu":
            return model.arrays()
        return {k: self.device.to_host(v).copy() for k, v in model.arrays().items()}

    def _plan(self, model) -> Plan:
        shapes = model.param_shapes()
        tensors = [[name, list(shape), dtype] for name, (shape, dtype) in sorted(shapes.items())]
        if self.a["init"]:
            body = self._report("plan", {"tensors": tensors, "nonlearned": model.nonlearned_names()})
            plan = Plan.from_wire(body["plan"])
        else:
            plan = Plan.from_wire(self.a["plan"])
        mine = {name: (tuple(shape), dtype) for name, shape, dtype in tensors}
        theirs = {t.name: (t.shape, t.dtype) for t in plan.tensors}
        if mine != theirs:
            raise ValueError(f"job {self.job}: this worker's model has other tensors than the job's plan")
        return plan

    def _client(self, plan: Plan) -> ParamClient:
        self.client = ParamClient(self.a["shards"], plan, job=self.job, worker=self.worker, ctx=self.ctx,
                                  timeout_s=10.0, retries=3,
                                  resolve=lambda: self.heartbeat.shard_addresses(self.job))
        return self.client

    # --- training ---

    def _train(self) -> Outcome:
        model, train, test = self._build()
        plan = self._plan(model)
        client = self._client(plan)
        host = self._host_arrays(model)
        if self.a["init"]:
            existed = client.create(host, optimizer=self.spec["optimizer"], policy=self.spec["consistency"],
                                    nonlearned=model.nonlearned_names(),
                                    checkpoint_every=int(self.spec.get("checkpoint_every") or 0))
            log.info("tables created", extra={"job": self.job, "existed": existed, "slices": len(plan.slices)})
            self._report("initialized", {})
        partition, partitions = self.a["partition"], self.a["partitions"]
        seed = int(self.spec["seed"])
        batch_size = int(self.spec["data"]["batch_size"])
        batches = worker_batches(train, k=partition, num=partitions, batch_size=batch_size, seed=seed)
        if hasattr(model, "seed_dropout"):
            model.seed_dropout(seed * 1000 + partition + 1)  # same weights, own dropout masks
        steps = total_steps(self.spec, len(batches))
        eval_every = int(self.spec.get("eval_every") or 0) or max(MIN_EVAL_INTERVAL_STEPS, batches.steps_per_epoch)
        # Where this partition stands: the clocks the shards keep for us.
        client.pull(clock=-1, out=host)
        self._load(model, host)
        step = max(max(client.clocks), 0)
        micro = int(self.spec["data"].get("micro_batches", 1))
        examples, busy_s, started = 0, 0.0, time.perf_counter()
        loss = acc = float("nan")
        max_stale = 0
        log.info("training", extra={"job": self.job, "partition": partition, "from_step": step, "steps": steps})
        while step < steps:
            if self.heartbeat.stop_requested.is_set():
                return self._leave("stopped", step, steps, loss, acc, examples)
            t0 = time.perf_counter()
            x, y = batches.batch(step)
            xp = self.device.xp
            loss, acc = accumulate_gradients(model, xp.asarray(x), xp.asarray(y), micro)
            grads = dict(model.grads)
            norm = global_norm(grads)
            grads.update(model.stat_deltas())
            if self.device.name != "cpu":
                grads = {k: self.device.to_host(v) for k, v in grads.items()}
            if self.slowdown > 1.0:
                # Experiments only: this worker computes `slowdown` times slower
                # (a straggler). The round trip is not scaled: it may hold time
                # a policy made us wait, and slowed workers waiting on each other
                # would compound step after step.
                time.sleep((time.perf_counter() - t0) * (self.slowdown - 1.0))
            base = list(client.versions)
            client.push_pull(grads, clock=None, norm=norm, out=host)
            # Replies carry the version they reflect: the updates that landed
            # between the pull this gradient came from and its own update.
            stale = max(0, max(after - before - 1 for before, after in zip(base, client.versions)))
            max_stale = max(max_stale, stale)
            self._load(model, host)
            step = max(step + 1, max(client.clocks))
            examples += len(x)
            busy_s += time.perf_counter() - t0
            state = {"step": step, "total_steps": steps, "loss": float(loss), "accuracy": float(acc),
                     "examples": examples, "examples_per_s": examples / max(busy_s, 1e-9),
                     "partition": partition, "versions": list(client.versions),
                     "staleness": stale, "max_staleness": max_stale}
            self.heartbeat.report(self.job, state)
            self._observe(time.perf_counter() - t0, len(x), loss, acc, stale)
            if not math.isfinite(loss):
                raise ValueError(f"job {self.job}: training loss is {loss} at step {step} (diverged)")
            if partition == 0 and (step % eval_every == 0 or step == steps):
                test_loss, test_acc = evaluate(model, test, xp=self.device.xp)
                if self.metrics is not None:
                    self.metrics.set("test_accuracy", test_acc, job=self.job)
                self._report("eval", {"step": step, "test_accuracy": test_acc, "test_loss": test_loss})
        self._report("done", {"step": step, "total_steps": steps, "loss": float(loss), "accuracy": float(acc),
                              "examples": examples, "wall_s": time.perf_counter() - started})
        return Outcome("done")

    def _observe(self, step_s: float, examples: int, loss: float, acc: float, stale: int) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        m.inc("steps_total", job=self.job)
        m.inc("examples_total", examples, job=self.job)
        m.histogram("step_seconds", STEP_SECONDS_BUCKETS, job=self.job).observe(step_s)
        m.histogram("staleness_seen", STALENESS_BUCKETS, job=self.job).observe(stale)
        m.set("loss", loss, job=self.job)
        m.set("accuracy", acc, job=self.job)
        m.set("examples_per_second", examples / max(step_s, 1e-9), job=self.job)

    def _load(self, model, host: dict) -> None:
        if self.device.name != "cpu":
            model.load(host)

    def _leave(self, status: str, step: int, steps: int, loss: float, acc: float, examples: int) -> Outcome:
        self._report("stopped", {"step": step, "total_steps": steps, "loss": float(loss), "accuracy": float(acc),
                                 "examples": examples})
        return Outcome(status)

    # --- final evaluation ---

    def _evaluate_final(self) -> Outcome:
        model, _train, test = self._build()
        plan = self._plan(model)
        host = self._host_arrays(model)
        self._client(plan).pull(clock=-1, out=host)
        self._load(model, host)
        test_loss, test_acc = evaluate(model, test, xp=self.device.xp)
        self._report("final", {"test_accuracy": test_acc, "test_loss": test_loss})
        log.info("final evaluation", extra={"job": self.job, "test_accuracy": round(test_acc, 4)})
        return Outcome("done")
