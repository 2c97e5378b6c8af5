"""`psctl bench nn`: the command; the benchmark itself is worker/bench/nn.py.

Plugged into `psctl bench` by the `psctl.bench` entry points of setup.cfg;
the backprop library is imported inside the function only.
"""
from __future__ import annotations

import json

import click


@click.command("nn")
@click.option("--device", type=click.Choice(["cpu", "gpu", "auto"]), default="cpu",
              show_default=True, help="numpy on the CPU, cupy on a CUDA GPU, or the GPU if usable.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--min-time", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, metavar="SECONDS",
              help="Timed seconds per measured figure (five figures, plus warm-up).")
def nn(device: str, as_json: bool, min_time: float) -> None:
    """Time forward+backward of an MLP and a CNN against raw matmul speed.

    ratio = achieved GFLOP/s of a train_step (its matmul and convolution
    FLOPs) over the GFLOP/s of the same MLP matmuls run alone; 1.0 means no
    overhead. conv ratio = GFLOP/s of the CNN's convolution layers alone
    (forward and backward) over a square matmul of the same FLOPs.
    """
    # Lazy: ps must stay importable without worker.
    from worker.bench.nn import format_table, run_nn_bench
    from worker.device import DeviceError

    try:
        rows = run_nn_bench(device, min_time_s=min_time)
    except DeviceError as exc:
        raise click.ClickException(str(exc)) from exc
    used = rows[0]["device"] if rows else device
    if as_json:
        click.echo(json.dumps({"results": rows, "device": used}))
        return
    click.echo(f"device: {used}")
    click.echo(format_table(rows))
