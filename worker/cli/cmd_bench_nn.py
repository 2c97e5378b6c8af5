"""`psctl bench nn`: train_step throughput of the backprop library against the
array module's own matmul speed, measured in the same run.

Plugged into `psctl bench` by the `psctl.bench` entry points of setup.cfg;
the backprop library is imported inside the function only.
"""
from __future__ import annotations

import json

import click

COLUMNS = (  # (header, row key, format)
    ("model", "model", "{}"),
    ("batch", "batch", "{}"),
    ("examples/s", "examples_per_s", "{:,.0f}"),
    ("GFLOP/s", "gflops", "{:.1f}"),
    ("matmul GFLOP/s", "matmul_gflops", "{:.1f}"),
    ("ratio", "ratio", "{:.2f}"),
)


def format_table(rows: list[dict]) -> str:
    """Rows as an aligned text table (text left, numbers right)."""
    cells = [[fmt.format(row[key]) for _, key, fmt in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(COLUMNS)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([line([h for h, _, _ in COLUMNS]), *(line(c) for c in cells)])


@click.command("nn")
@click.option("--device", type=click.Choice(["cpu", "gpu", "auto"]), default="cpu",
              show_default=True, help="numpy on the CPU, cupy on a CUDA GPU, or the GPU if usable.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--min-time", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, metavar="SECONDS",
              help="Timed seconds per measured figure (three figures, plus warm-up).")
def nn(device: str, as_json: bool, min_time: float) -> None:
    """Time forward+backward of an MLP and a CNN against raw matmul speed.

    ratio = achieved GFLOP/s of a train_step (its matmul FLOPs) over the
    GFLOP/s of the same MLP matmuls run alone; 1.0 means no overhead.
    """
    # Lazy: ps must stay importable without worker.
    from worker.device import DeviceError
    from worker.nn.bench import run_nn_bench

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
