"""One policy's run for `psctl bench consistency`: a fresh local cluster, one job, its trajectory.

`run_policy` starts a scheduler, the servers and the workers (the last
`slow_workers` of them with `--slowdown`), submits the job and, every
`poll_s` until the job ends, records one `Sample`:

- the job's *training loss*: the current parameters, read from the shards
  with a plain pull (clock -1: never held, never counted by a policy),
  evaluated on the whole training split in this process. The workers'
  reported losses (one 32-example batch each, sent every 0.5 s) are kept
  too, but are too noisy to say when a target was first reached;
Times count from the first sample at which the job's tables exist on
every shard (training can start), so the start-up of a job (the first
worker building the model and creating the tables, the others being
assigned) is left out: it does not depend on the policy.

Also per sample:

- the worker steps done so far, all workers together (the shards' push
  count: every step pushes once to every shard);
- the shards' clock table: the spread between the fastest and the slowest
  live worker (in steps), and the pulls parked right now;
- the largest version staleness of the pushes applied so far (the shards'
  staleness histogram: updates that landed between the version a gradient
  was computed from and its application; BSP never records any).

Imports `worker` (it evaluates the model), so the CLI imports this module
lazily, inside the command.
"""
from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass, field

from worker.cli.cmd_run import LocalCluster

# How long a job may run before the bench gives up on it.
JOB_TIMEOUT_S = 300.0
FINAL_STATES = ("succeeded", "failed", "cancelled")


@dataclass
class Sample:
    """The job at `t_s` seconds after submission."""

    t_s: float                   # since the job's tables first answered
    train_loss: float | None     # of the current parameters, on the whole training split
    reported_loss: float | None  # the mean of the workers' last batch losses
    steps: int                   # worker steps so far, all workers together
    clock_spread: int            # fastest minus slowest live clock, largest over the shards
    live_workers: int            # workers in the shards' clock table (finished ones leave it)
    parked: int                  # pulls parked right now, all shards
    version_staleness: int       # largest staleness (in versions) of any push applied so far


@dataclass
class PolicyRun:
    """What one policy's run produced."""

    label: str
    policy: str
    staleness_bound: int | None
    job: str = ""
    state: str = ""
    result: dict = field(default_factory=dict)
    error: str = ""
    samples: list[Sample] = field(default_factory=list)


class Observer:
    """Reads a running job's parameters and shard stats straight from its shards."""

    def __init__(self, spec: dict, export_body: dict, job: str):
        from protocol.plan import Plan
        from worker.client import ParamClient
        from worker.data import load_dataset
        from worker.nn.model import build_model

        seed = int(spec["seed"])
        self.train, _test = load_dataset(spec["data"], seed=seed)
        self.model = build_model(spec["model"], self.train.input_shape, self.train.num_classes, seed=seed)
        self.arrays = self.model.arrays()
        self.job = job
        self.client = ParamClient(export_body["shards"], Plan.from_wire(export_body["plan"]), job=job,
                                  worker="bench-observer", timeout_s=5.0, retries=2)

    def close(self) -> None:
        self.client.close()

    def sample(self, t_s: float, reported_loss: float | None) -> Sample | None:
        """One sample, or None while the job's tables are not created yet (or a shard
        did not answer in time). Blocks for a few round trips; raises ShardError."""
        from worker.client import ShardError, ShardTimeout
        from worker.trainer import evaluate

        try:
            stats = self.client.stats()
            tables = [s["jobs"][self.job] for s in stats if self.job in s["jobs"]]
            if len(tables) < len(stats):
                return None
            self.client.pull(clock=-1, out=self.arrays)
        except ShardTimeout:
            return None  # a shard busy past the timeout: skip this sample, not the run
        except ShardError as exc:
            if exc.code.value == "unknown_job":
                return None
            raise
        loss, _acc = evaluate(self.model, self.train)
        spread = max((t["max_clock"] - t["min_clock"] for t in tables if t["clocks"]), default=0)
        hist = [int(k) for t in tables for k, v in t["staleness_hist"].items() if v]
        return Sample(t_s=t_s, train_loss=float(loss), reported_loss=reported_loss,
                      steps=max(t["pushes"] for t in tables), clock_spread=int(spread),
                      live_workers=max(len(t["clocks"]) for t in tables),
                      parked=sum(t["parked"] for t in tables), version_staleness=max(hist, default=0))


def run_policy(spec: dict, label: str, *, servers: int, workers: int, slowdown: float, slow_workers: int,
               log_dir: str, poll_s: float, timeout_s: float = JOB_TIMEOUT_S) -> PolicyRun:
    """Run `spec` on a cluster started for it, sampling every `poll_s`; always stops the cluster.

    Blocks until the job ends. Raises click.ClickException when a process
    does not start or the job outlives `timeout_s`.
    """
    import click

    from protocol.messages import Export, Status, Submit
    from worker.cli.cmd_jobs import _call

    consistency = spec["consistency"]
    run = PolicyRun(label=label, policy=consistency["policy"],
                    staleness_bound=consistency["staleness"] if consistency["policy"] == "ssp" else None)
    os.makedirs(log_dir, exist_ok=True)
    cluster = LocalCluster(log_dir)
    observer: Observer | None = None
    client = None
    try:
        worker_args = [["--slowdown", str(slowdown)] if i >= workers - slow_workers and slowdown > 1 else []
                       for i in range(workers)]
        _addr, client = cluster.boot(servers, worker_args)
        run.job = _call(client, Submit(spec=spec, submission_id=uuid.uuid4().hex))["job"]
        deadline = time.monotonic() + timeout_s
        t0 = None
        while True:
            body = _call(client, Status(job=run.job))
            if observer is None and body.get("plan_digest"):
                observer = Observer(spec, _call(client, Export(job=run.job)), run.job)
            if observer is not None:
                now = time.monotonic()
                sample = observer.sample(now - (t0 or now), (body.get("progress") or {}).get("loss"))
                if sample is not None:
                    t0 = t0 or now
                    run.samples.append(sample)
            if body["state"] in FINAL_STATES:
                run.state, run.result, run.error = body["state"], body.get("result") or {}, body.get("error") or ""
                return run
            if time.monotonic() > deadline:
                raise click.ClickException(f"{label}: job {run.job} did not end within {timeout_s:g}s "
                                           f"(logs in {log_dir})")
            time.sleep(poll_s)  # sampling a running job at a fixed rate, not waiting for an event
    finally:
        if observer is not None:
            observer.close()
        if client is not None:
            client.close()
        cluster.stop()


def steps_per_s(samples: list[Sample], workers: int) -> float | None:
    """Worker steps per second, all workers together, while every worker trained.

    Measured between the first and the last sample at which all `workers`
    were in the clock table: the job's whole wall time would not show the
    difference, since under every policy the job ends with the straggler's
    last step. None with fewer than two such samples (a very short job).
    """
    live = [s for s in samples if s.live_workers >= workers]
    if len(live) < 2 or live[-1].t_s <= live[0].t_s:
        return None
    return (live[-1].steps - live[0].steps) / (live[-1].t_s - live[0].t_s)


def summarize(run: PolicyRun, *, target_loss: float, workers: int, batch_size: int) -> dict:
    """One run's row of the bench's table (the JSON fields of the issue, then extras).

    steps_per_s falls back to the job's worker steps over its wall time when
    the job was too short to sample while every worker trained.
    """
    reached = next((s for s in run.samples if s.train_loss is not None and s.train_loss <= target_loss), None)
    result = run.result
    wall = result.get("wall_s") or 0.0
    rate = steps_per_s(run.samples, workers)
    if rate is None and wall > 0 and result.get("examples"):
        rate = result["examples"] / batch_size / wall
    return {
        "policy": run.policy,
        "staleness_bound": run.staleness_bound,
        "time_to_target_s": round(reached.t_s, 3) if reached else None,
        "steps_per_s": round(rate, 2) if rate is not None else None,
        "test_accuracy": result.get("test_accuracy"),
        "max_staleness_seen": max((s.clock_spread for s in run.samples), default=0),
        "label": run.label,
        "state": run.state,
        "steps_to_target": reached.steps if reached else None,
        "final_train_loss": run.samples[-1].train_loss if run.samples else None,
        "max_version_staleness": max((s.version_staleness for s in run.samples), default=0),
        "max_parked_seen": max((s.parked for s in run.samples), default=0),
        "wall_s": round(wall, 3) if wall else None,
        "error": run.error,
    }


def _median(values: list) -> float | None:
    """The median of `values`, None counting as +infinity (never reached); None if that is the median."""
    if not values:
        return None
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    lo, hi = ordered[mid - 1], ordered[mid]
    return None if lo is None or hi is None else (lo + hi) / 2


def aggregate(rows: list[dict]) -> dict:
    """One policy's row over repeated runs: medians of the measurements, maxima of the staleness
    figures, and every run's time to target in `time_to_target_runs`."""
    out = dict(rows[0])
    for key in ("time_to_target_s", "steps_per_s", "test_accuracy", "steps_to_target", "final_train_loss", "wall_s"):
        out[key] = _median([r[key] for r in rows])
    for key in ("max_staleness_seen", "max_version_staleness", "max_parked_seen"):
        out[key] = max(r[key] for r in rows)
    out["state"] = "succeeded" if all(r["state"] == "succeeded" for r in rows) else \
        next(r["state"] for r in rows if r["state"] != "succeeded")
    out["error"] = next((r["error"] for r in rows if r["error"]), "")
    out["repeats"] = len(rows)
    out["time_to_target_runs"] = [r["time_to_target_s"] for r in rows]
    return out
