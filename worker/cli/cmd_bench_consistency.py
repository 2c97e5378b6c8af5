"""`psctl bench consistency`: BSP, SSP(s) and ASP with a straggler, after Ho et al. (NIPS 2013).

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
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile

import click

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
    """'bsp,ssp3,asp' -> [(label, consistency section)]; ClickException naming a bad entry."""
    out = []
    for label in (p.strip().lower() for p in text.split(",")):
        m = _POLICY_RE.match(label)
        if not m:
            raise click.ClickException(f"--policies: expected names like bsp, ssp3, asp, found {label!r}")
        if m.group(2) is not None:
            out.append((label, {"policy": "ssp", "staleness": int(m.group(2))}))
        else:
            out.append((label, {"policy": label}))
    if len({label for label, _ in out}) != len(out):
        raise click.ClickException(f"--policies: a policy is named twice in {text!r}")
    return out


def job_for(consistency: dict, *, steps: int, workers: int) -> dict:
    """The normalized bench job under one policy."""
    from protocol.jobspec import SpecError, validate_job

    raw = {**BENCH_JOB, "steps": steps, "workers": workers, "consistency": consistency,
           "name": f"bench-{consistency['policy']}{consistency.get('staleness', '')}"}
    try:
        return validate_job(raw)
    except SpecError as exc:  # a bug in BENCH_JOB or an option the spec refuses
        raise click.ClickException(str(exc)) from None


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


@click.command("consistency")
@click.option("--slowdown", type=click.FloatRange(1.0, 100.0), default=3.0, show_default=True,
              help="The straggler's `psctl worker --slowdown`: it multiplies the compute part of each step.")
@click.option("--steps", type=click.IntRange(1), default=BENCH_JOB["steps"], show_default=True,
              help="Steps per worker.")
@click.option("--target-loss", type=click.FloatRange(0.0, min_open=True), default=0.1, show_default=True,
              help="Training loss whose first crossing is timed.")
@click.option("--policies", default=DEFAULT_POLICIES, show_default=True,
              help="Comma-separated: bsp, asp, sspN (N = staleness bound).")
@click.option("--workers", type=click.IntRange(2, 16), default=3, show_default=True,
              help="Workers (data partitions); the last one is the straggler.")
@click.option("--servers", type=click.IntRange(1, 8), default=1, show_default=True, help="Server shards.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=DEFAULT_PLOT, show_default=True,
              help="Write the loss curves to this PNG.")
@click.option("--poll", "poll_s", type=click.FloatRange(0.05, 5.0), default=0.2, show_default=True,
              help="Seconds between samples of a running job.")
@click.option("--repeat", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Runs per policy (round-robin); the table shows medians.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per policy (one per line).")
def consistency(slowdown, steps, target_loss, policies, workers, servers, plot_path, poll_s, repeat, as_json):
    """Run one job under BSP, SSP(s) and ASP with a straggler; compare time to a target loss."""
    from worker.cli.consistency_runner import aggregate, run_policy, summarize

    chosen = parse_policies(policies)
    jobs = [(label, job_for(c, steps=steps, workers=workers)) for label, c in chosen]
    runs = []
    per_label: dict[str, list[dict]] = {label: [] for label, _ in jobs}
    for r in range(repeat):
        for label, spec in jobs:
            log_dir = tempfile.mkdtemp(prefix=f"psctl-bench-{label}-")
            click.echo(f"{label}: run {r + 1}/{repeat}, {steps} steps x {workers} workers, "
                       f"one {slowdown:g}x slower ...", err=True)
            run = run_policy(spec, label, servers=servers, workers=workers, slowdown=slowdown, slow_workers=1,
                             log_dir=log_dir, poll_s=poll_s)
            if run.state == "succeeded":
                shutil.rmtree(log_dir, ignore_errors=True)
            else:
                click.echo(f"{label}: job {run.job} {run.state}: {run.error or 'no error given'} "
                           f"(logs in {log_dir})", err=True)
            runs.append(run)
            per_label[label].append(summarize(run, target_loss=target_loss, workers=workers,
                                              batch_size=spec["data"]["batch_size"]))
    rows = [aggregate(per_label[label]) for label, _ in jobs]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, sort_keys=True))
    else:
        click.echo(render_table(rows, target_loss=target_loss, slowdown=slowdown))
    if write_plot(runs, plot_path, target_loss=target_loss, slowdown=slowdown):
        click.echo(f"plot: {plot_path}", err=True)
    else:
        click.echo("matplotlib is not installed, so no plot was written (pip install matplotlib).", err=True)
