"""`psctl bench overlap`: the command; the benchmark itself is worker/bench/overlap.py.

Plugged into `psctl bench` by the `psctl.bench` entry points of setup.cfg.
"""
from __future__ import annotations

import json

import click

from worker.cli.common import BadInput, sigterm_as_interrupt


@click.command("overlap")
@click.option("--params", default="25M", show_default=True, metavar="COUNT",
              help="Parameters of the MLP (25M, 2M, or a plain number): hidden [H, H] on sklearn:digits.")
@click.option("--servers", type=click.IntRange(1, 64), default=1, show_default=True, help="Server shards.")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True, help="Workers.")
@click.option("--steps", type=click.IntRange(2, 100_000), default=20, show_default=True,
              help="Steps per partition of each run.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Examples per partition and step.")
@click.option("--policy", type=click.Choice(["bsp", "ssp", "asp"]), default="bsp", show_default=True,
              help="The job's consistency policy.")
@click.option("--repeat", type=click.IntRange(1, 100), default=2, show_default=True,
              help="Runs each way (off and on alternate); the median is shown.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the report.")
def overlap(params, servers, workers, steps, batch_size, policy, repeat, as_json):
    """Examples/s of the same job with `overlap` off and on, alternating on one local cluster.

    With overlap on, each layer's gradient goes to the shards as soon as
    its backward is done (last layer first) while the earlier layers
    compute; off, the whole gradient is computed, then sent.
    """
    from worker.bench import overlap as bench
    from worker.bench.scale import parse_count
    from worker.local_cluster import ClusterError

    try:
        count = parse_count(params)
        bench.job_spec(count, workers=workers, steps=steps, batch_size=batch_size, policy=policy, overlap=True)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    log = (lambda line: click.echo(line, err=True)) if not as_json else (lambda _line: None)
    try:
        with sigterm_as_interrupt():
            out = bench.run(count, servers=servers, workers=workers, steps=steps, batch_size=batch_size,
                            policy=policy, repeat=repeat, log=log)
    except (ClusterError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(out) if as_json else bench.format_report(out))
