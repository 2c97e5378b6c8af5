"""`psctl bench consistency`: the command; the benchmark itself is worker/bench/consistency.py.

Plugged into `psctl bench` by the `psctl.bench` entry points of setup.cfg.
"""
from __future__ import annotations

import json

import click

from worker.bench.consistency import BENCH_JOB, DEFAULT_PLOT, DEFAULT_POLICIES


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
    from worker.bench import consistency as bench
    from worker.local_cluster import ClusterError

    try:
        jobs = [(label, bench.job_for(c, steps=steps, workers=workers)) for label, c in bench.parse_policies(policies)]
    except ValueError as exc:  # a bad --policies, or an option the job spec refuses
        raise click.ClickException(str(exc)) from None
    try:
        rows, runs = bench.run_all(jobs, repeat=repeat, servers=servers, workers=workers, slowdown=slowdown,
                                   poll_s=poll_s, target_loss=target_loss, log=lambda line: click.echo(line, err=True))
    except (ClusterError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, sort_keys=True))
    else:
        click.echo(bench.render_table(rows, target_loss=target_loss, slowdown=slowdown))
    if bench.write_plot(runs, plot_path, target_loss=target_loss, slowdown=slowdown):
        click.echo(f"plot: {plot_path}", err=True)
    else:
        click.echo("matplotlib is not installed, so no plot was written (pip install matplotlib).", err=True)
