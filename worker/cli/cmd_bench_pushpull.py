"""`psctl bench pushpull`: the command; the benchmark itself is worker/bench/pushpull.py.

Plugged into `psctl bench` by the `psctl.bench` entry points of setup.cfg.
"""
from __future__ import annotations

import json

import click

from worker.bench.pushpull import DEFAULT_PARTITION_BYTES, DEFAULT_SIZES_BYTES
from worker.cli.common import as_usage_error, sizes_option


@click.command("pushpull")
@click.option("--servers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Shard processes to start (and as many raw echo processes).")
@click.option("--size", "sizes", callback=sizes_option, multiple=True, metavar="BYTES",
              help="Bytes of parameters pushed and pulled per call; repeat for several "
                   "[default: 4KiB, 1MiB, 16MiB].")
@click.option("--tensors", type=click.IntRange(1, 100_000), default=1, show_default=True,
              help="Split each size over this many float32 tensors (many small tensors batch "
                   "into one message per shard).")
@click.option("--partition-bytes", callback=sizes_option, default=str(DEFAULT_PARTITION_BYTES), show_default=True,
              help="Largest slice of a tensor on one shard.")
@click.option("--repeat", type=click.IntRange(1), default=None,
              help="Timed calls per figure (each of ours and raw); overrides --min-time.")
@click.option("--min-time", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              metavar="SECONDS", help="Timed seconds per op and size, ours and raw together.")
@click.option("--curve", is_flag=True,
              help="Also time the same calls with CURVE on (throwaway keys), and print CURVE over plain.")
@click.option("--wire", default=None, metavar="fp16|topk:R",
              help="Also time the same calls with gradients sent this way (a job's `compression`), and print "
                   "their median over float32's (wire/f32).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def pushpull(servers: int, sizes: tuple[int, ...], tensors: int, partition_bytes: int, repeat: int | None,
             min_time: float, curve: bool, wire: str | None, as_json: bool) -> None:
    """Time push, pull and push_pull through S shard processes against raw pyzmq.

    GB/s counts payload bytes sent plus received; slowdown is our median
    over the raw median of the same bytes, measured in the same run; over
    floor is our median over raw plus the least numpy work those bytes need
    (a one-pass update on the server, one copy into the client's arrays).
    With --curve, S more shards run with CURVE authentication and
    encryption, called in the same rounds: curve/plain is their median over
    ours without CURVE.
    """
    from protocol.compression import parse
    from worker.bench import pushpull as bench
    from worker.local_cluster import ClusterError

    sizes = list(sizes) or list(DEFAULT_SIZES_BYTES)
    as_usage_error(bench.check_sizes, sizes, tensors, partition_bytes)
    if wire is not None:
        as_usage_error(parse, wire)
        if curve:
            raise click.UsageError("--wire and --curve are measured in separate runs: give one of them")
    try:
        rows = bench.run(servers, sizes, partition_bytes=partition_bytes, tensors=tensors, repeat=repeat,
                         min_time_s=min_time, curve=curve, wire=wire)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        facts = {"servers": servers, "partition_bytes": partition_bytes, "tensors": tensors, "transport": "tcp"}
        if curve:
            facts["curve"] = True
        if wire:
            facts["wire"] = wire
        click.echo(json.dumps({**facts, "results": rows}))
        return
    click.echo(bench.describe(servers, partition_bytes, tensors, curve))
    click.echo(bench.format_table(rows))
