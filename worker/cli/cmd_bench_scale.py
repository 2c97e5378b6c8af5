"""`psctl bench scale`: the command; the benchmark itself is worker/bench/scale.py.

Plugged into `psctl bench` by the `psctl.bench` entry points of setup.cfg.
"""
from __future__ import annotations

import json

import click

from worker.bench.scale import DEFAULT_TIMEOUT_S, POLICIES
from worker.cli.cmd_worker import threads_option
from worker.cli.common import BadInput, sigterm_as_interrupt


def _count_option(ctx, param, value):
    """click callback: a parameter count such as 2M, 500M, 1.5G or 2000000 (else one sentence, exit 2)."""
    from worker.bench.scale import parse_count

    try:
        return parse_count(value)
    except ValueError as exc:
        raise BadInput(str(exc)) from None


@click.command("scale")
@click.option("--params", callback=_count_option, default="20M", show_default=True, metavar="COUNT",
              help="Parameters of the model (2M, 500M, 1.5G, or a plain number): an MLP with two hidden layers "
                   "of one width, sized to within 1%.")
@click.option("--servers", type=click.IntRange(1, 64), default=2, show_default=True, help="Server shards.")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Workers (one data partition each).")
@click.option("--steps", type=click.IntRange(1, 1000), default=3, show_default=True, help="Steps per worker.")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Examples per worker and step.")
@click.option("--policy", type=click.Choice(POLICIES), default="asp", show_default=True,
              help="The job's consistency policy; bsp also keeps a gradient-sized sum buffer on each shard, so "
                   "the shards' memory grows by a third.")
@click.option("--threads-per-worker", "threads", callback=threads_option, default=None, metavar="N",
              help="BLAS threads of each worker (default: this machine's cores // workers, at least 1).")
@click.option("--repeat", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="Warm push_pull calls timed (each of ours and raw pyzmq); the median is shown.")
@click.option("--timeout", type=click.FloatRange(1, 86400), default=DEFAULT_TIMEOUT_S, show_default=True,
              metavar="SECONDS", help="Give up on the job after this long.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def scale(params, servers, workers, steps, batch_size, policy, threads, repeat, timeout, as_json):
    """Train a wide MLP of --params parameters with Adam on S shards and W workers for a few steps.

    Prints each shard's and worker's peak RSS against the bytes it holds,
    cold and warm push_pull of the whole model against raw pyzmq moving the
    same bytes in the same run, and the examples/s the job did.
    """
    from worker.bench import scale as bench
    from worker.client import ShardError, ShardTimeout
    from worker.local_cluster import ClusterError

    try:
        bench.job_spec(params, workers=workers, steps=steps, batch_size=batch_size, policy=policy)
    except ValueError as exc:  # the job spec refuses an option
        raise BadInput(str(exc)) from None
    try:
        with sigterm_as_interrupt():  # SIGTERM cleans up as Ctrl-C does: every process stopped and reaped
            out = bench.run(params, servers=servers, workers=workers, steps=steps, batch_size=batch_size,
                            policy=policy, repeat=repeat, threads_per_worker=threads, timeout_s=timeout,
                            log=lambda line: click.echo(line, err=True))
    except (ClusterError, bench.ScaleError, ShardError, ShardTimeout, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(out) if as_json else bench.format_report(out))
