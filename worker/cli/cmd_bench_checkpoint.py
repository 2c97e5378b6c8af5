"""`psctl bench checkpoint`: the command; the benchmark itself is worker/bench/checkpoint_bench.py.

Plugged into `psctl bench` by the `psctl.bench` entry points of setup.cfg.
"""
from __future__ import annotations

import json

import click

from worker.bench.checkpoint_bench import (
    DEFAULT_EVERY,
    DEFAULT_PARAMS,
    DEFAULT_PARTITION_BYTES,
    DEFAULT_ROUNDS,
    DEFAULT_STEPS,
    OPTIMIZERS,
    parse_count,
)
from worker.cli.common import as_usage_error, sizes_option


def _params(ctx, param, value):
    try:
        return parse_count(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("checkpoint")
@click.option("--params", callback=_params, default=f"{DEFAULT_PARAMS // 10**6}M", show_default=True,
              help="float32 parameters of the model (100M, 20M, 50000...).")
@click.option("--every", type=click.IntRange(1), default=DEFAULT_EVERY, show_default=True,
              help="Checkpoint every N versions (steps) in the checkpointed half.")
@click.option("--steps", type=click.IntRange(1), default=DEFAULT_STEPS, show_default=True,
              help="Timed steps per block; each round is a block without checkpoints, then one with.")
@click.option("--rounds", type=click.IntRange(1), default=DEFAULT_ROUNDS, show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="momentum", show_default=True,
              help="Its state is part of every checkpoint (momentum: one array the size of the model, adam two).")
@click.option("--partition-bytes", callback=sizes_option, default=str(DEFAULT_PARTITION_BYTES), show_default=True,
              help="Largest slice of the tensor.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def checkpoint(params: int, every: int, steps: int, rounds: int, optimizer: str, partition_bytes: int,
               as_json: bool) -> None:
    """Time a shard's steps with checkpoints every N steps against the same steps without, in one run.

    One shard process holds two tables of the same model; the bench pushes
    and pulls both, block by block, and prints the step times of each and
    their ratio, with the shard's own figures for the writes (done on its
    writer thread: the steps only pay for the snapshot and the machine's
    share of the write).
    """
    from worker.bench import checkpoint_bench as bench
    from worker.local_cluster import ClusterError

    as_usage_error(bench.check, params, every, steps)
    try:
        result = bench.run(params, every=every, steps=steps, rounds=rounds, optimizer=optimizer,
                           partition_bytes=partition_bytes)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result) if as_json else bench.describe(result))
