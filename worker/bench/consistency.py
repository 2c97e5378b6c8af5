"""The consistency benchmark behind `psctl bench consistency`: BSP, SSP(s) and ASP with a
straggler, after Ho et al. (NIPS 2013).

The same job (an MLP on sklearn:digits, three workers) runs once per
policy, each time on a fresh local cluster whose last worker is slowed
down by `--slowdown` (the worker's experiments-only option: its compute
in each step takes that many times as long). Per policy it reports:

- time_to_target_s: seconds from the moment the job's parameters exist on
  the shards until the training loss (of the current parameters, on the
  whole training split, sampled every `--poll` seconds) first falls to
  `--target-loss`; null if it never does;
- steps_per_s: worker steps (one batch's gradient pushed) per second, all
  workers together, while every worker was training (the job's wall time
  would hide it: under every policy a job ends with the straggler's last
  step);
- test_accuracy: the job's final evaluation;
- max_staleness_seen: the largest clock spread sampled on the shards
  (fastest minus slowest live worker, in steps). Under SSP(s) it can reach
  s + 1 (a worker that pushed step c is at clock c + 1 while its pull for
  c + 1 is parked), under BSP 1, under ASP anything;

and, besides the issue's fields: steps_to_target (worker steps done when
the target was reached: the per-iteration comparison), final_train_loss,
max_version_staleness (the largest number of updates that landed between a
gradient's base version and its application; BSP records none),
max_parked_seen and wall_s. It writes a PNG with the training loss against
wall time and against worker steps, one line per policy and run.

Wall-clock figures on a small shared machine vary from run to run by tens
of percent: `--repeat N` runs every policy N times (round-robin, so a slow
spell of the machine hits every policy alike) and reports medians (of the
staleness figures: maxima), with each run's time in time_to_target_runs.

Policy names: bsp, asp, sspN (N = the staleness bound, e.g. ssp3).

One policy's run (`run_policy`) starts a fresh local cluster (a scheduler,
the servers and the workers, the last `slow_workers` of them with
`--slowdown`), submits the job and, every `poll_s` until the job ends,
records one `Sample`:

- the job's *training loss*: the current parameters, read from the shards
  with a plain pull (clock -1: never held, never counted by a policy),
  evaluated on the whole training split in this process. The workers'
  reported losses (one 32-example batch each, sent every 0.5 s) are kept
  too, but are too noisy to say when a target was first reached.

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

The command (worker/cli/cmd_bench_consistency.py) parses and prints; what
this module needs beyond the standard library and protocol/ (numpy, the
model, the clients) is imported inside the functions.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.errors import ErrorCode
from protocol.jobstate import FINAL_STATES, JobState
from worker.local_cluster import LocalCluster, request

DEFAULT_POLICIES = "bsp,ssp1,ssp3,ssp10,asp"
DEFAULT_PLOT = os.path.join("out", "consistency.png")

# The job every policy runs (README.md, "The job file"); --steps replaces `steps`.
# Plain momentum at lr 0.02 as in deploy/examples/digits-mlp.yaml: safe with
# gradients a few updates stale, so ASP's result is not a divergence story.
BENCH_JOB = {
    "name": "bench-consistency",
    "seed": 0,
    "workers": 3,
    "steps": 600,
    "eval_every": 100,
    "target_accuracy": None,
    "model": {"kind": "mlp", "hidden": [256], "activation": "relu"},
    "data": {"source": "sklearn:digits", "batch_size": 32, "test_fraction": 0.2},
    "optimizer": {"kind": "momentum", "lr": 0.02, "momentum": 0.9},
}

_POLICY_RE = re.compile(r"^(bsp|asp|ssp(\d+))$")


def parse_policies(text: str) -> list[tuple[str, dict]]:
    """'bsp,ssp3,asp' -> [(label, consistency section)]; ValueError naming a bad entry."""
    out = []
    for label in (p.strip().lower() for p in text.split(",")):
        m = _POLICY_RE.match(label)
        if not m:
            raise ValueError(f"--policies: expected names like bsp, ssp3, asp, found {label!r}")
        if m.group(2) is not None:
            out.append((label, {"policy": "ssp", "staleness": int(m.group(2))}))
        else:
            out.append((label, {"policy": label}))
    if len({label for label, _ in out}) != len(out):
        raise ValueError(f"--policies: a policy is named twice in {text!r}")
    return out


def job_for(consistency: dict, *, steps: int, workers: int) -> dict:
    """The normalized bench job under one policy; SpecError (a ValueError) if the spec refuses an option."""
    from protocol.jobspec import validate_job

    return validate_job({**BENCH_JOB, "steps": steps, "workers": workers, "consistency": consistency,
                         "name": f"bench-{consistency['policy']}{consistency.get('staleness', '')}"})


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(rows: list[dict], *, target_loss: float, slowdown: float) -> str:
    """The rows as an aligned table for people."""
    head = (f"{'policy':<7} {'s':>3} {'to target (s)':>13} {'steps/s':>8} {'test acc':>8} "
            f"{'max spread':>10} {'steps to target':>15} {'final loss':>10} {'max v-stale':>11}")
    lines = [f"consistency with one worker slowed {slowdown:g}x; target training loss {target_loss:g}", head]
    for r in rows:
        bound = "" if r["staleness_bound"] is None else str(r["staleness_bound"])
        lines.append(f"{r['label']:<7} {bound:>3} {_fmt(r['time_to_target_s'], '.2f'):>13} "
                     f"{_fmt(r['steps_per_s'], '.0f'):>8} {_fmt(r['test_accuracy'], '.4f'):>8} "
                     f"{r['max_staleness_seen']:>10} {_fmt(r['steps_to_target'], 'd'):>15} "
                     f"{_fmt(r['final_train_loss'], '.4f'):>10} {r['max_version_staleness']:>11}")
    return "\n".join(lines)


def write_plot(runs, path: str, *, target_loss: float, slowdown: float) -> bool:
    """Training loss against wall time and against worker steps, one line per policy; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fig, (by_time, by_steps) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors: dict[str, str] = {}
    for run in runs:
        pts = [s for s in run.samples if s.train_loss is not None and math.isfinite(s.train_loss)]
        if not pts:
            continue
        first = run.label not in colors
        kwargs = {"label": run.label if first else None, "lw": 1.6 if first else 1.0, "alpha": 1.0 if first else 0.35}
        if not first:
            kwargs["color"] = colors[run.label]
        line, = by_time.plot([s.t_s for s in pts], [s.train_loss for s in pts], **kwargs)
        colors.setdefault(run.label, line.get_color())
        kwargs["color"] = colors[run.label]
        by_steps.plot([s.steps for s in pts], [s.train_loss for s in pts], **kwargs)
    for ax, xlabel in ((by_time, "wall time since the parameters exist (s)"), (by_steps, "worker steps, all workers")):
        ax.axhline(target_loss, color="gray", ls="--", lw=1, label=f"target {target_loss:g}")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (whole training split)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    by_time.set_title(f"loss vs wall time (one worker {slowdown:g}x slower)")
    by_steps.set_title("loss vs worker steps (gradients computed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# How long a job may run before the bench gives up on it.
JOB_TIMEOUT_S = 300.0


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
        self.loaded = False  # a BAD_STATE once values were read is a real error, not the start-up
        self.client = ParamClient(export_body["shards"], Plan.from_wire(export_body["plan"]), job=job,
                                  worker="bench-observer", timeout_s=5.0, retries=2)

    def close(self) -> None:
        self.client.close()

    def sample(self, t_s: float, reported_loss: float | None) -> Sample | None:
        """One sample, or None while the job's tables are not created or not yet loaded
        by the initialising worker (or a shard did not answer in time). Blocks for
        a few round trips; raises ShardError."""
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
            if exc.code is ErrorCode.UNKNOWN_JOB or (exc.code is ErrorCode.BAD_STATE and not self.loaded):
                return None  # created but not yet loaded: the job has not started training
            raise
        self.loaded = True
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

    Blocks until the job ends. Raises ClusterError when a process does not
    start or the scheduler refuses a request, TimeoutError when the job
    outlives `timeout_s`.
    """
    from protocol.messages import Export, Status, Submit

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
        run.job = request(client, Submit(spec=spec, submission_id=uuid.uuid4().hex))["job"]
        deadline = time.monotonic() + timeout_s
        t0 = None
        while True:
            body = request(client, Status(job=run.job))
            if observer is None and body.get("plan_digest"):
                observer = Observer(spec, request(client, Export(job=run.job)), run.job)
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
                raise TimeoutError(f"{label}: job {run.job} did not end within {timeout_s:g}s (logs in {log_dir})")
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
    out["state"] = next((r["state"] for r in rows if r["state"] != JobState.SUCCEEDED), JobState.SUCCEEDED.value)
    out["error"] = next((r["error"] for r in rows if r["error"]), "")
    out["repeats"] = len(rows)
    out["time_to_target_runs"] = [r["time_to_target_s"] for r in rows]
    return out


def run_all(jobs: list[tuple[str, dict]], *, repeat: int, servers: int, workers: int, slowdown: float,
            poll_s: float, target_loss: float, log: Callable[[str], None]) -> tuple[list[dict], list[PolicyRun]]:
    """Run every (label, job) `repeat` times, round-robin, each on a fresh cluster whose last worker
    is the straggler; returns one aggregated row per label and every run (for the plot).

    `log` gets a line per run, and one naming the logs of a run that did
    not succeed (kept; a succeeded run's logs are removed).
    """
    runs = []
    per_label: dict[str, list[dict]] = {label: [] for label, _ in jobs}
    for r in range(repeat):
        for label, spec in jobs:
            log_dir = tempfile.mkdtemp(prefix=f"psctl-bench-{label}-")
            log(f"{label}: run {r + 1}/{repeat}, {spec['steps']} steps x {workers} workers, "
                f"one {slowdown:g}x slower ...")
            run = run_policy(spec, label, servers=servers, workers=workers, slowdown=slowdown, slow_workers=1,
                             log_dir=log_dir, poll_s=poll_s)
            if run.state == JobState.SUCCEEDED:
                shutil.rmtree(log_dir, ignore_errors=True)
            else:
                log(f"{label}: job {run.job} {run.state}: {run.error or 'no error given'} (logs in {log_dir})")
            runs.append(run)
            per_label[label].append(summarize(run, target_loss=target_loss, workers=workers,
                                              batch_size=spec["data"]["batch_size"]))
    return [aggregate(per_label[label]) for label, _ in jobs], runs
