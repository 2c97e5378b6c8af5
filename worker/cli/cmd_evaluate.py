"""`psctl evaluate FILE`: an exported model's test accuracy and loss on its job's test split, no cluster.

FILE is what `psctl export` wrote (worker/export_file.py): the model is
built from the job spec inside it, loaded with its tensors and run on the
job's own test split, with the same functions, seed and test_fraction as
the job's final evaluation, so on the same kind of device the figures are
the job's own.

Exit codes (README.md, "Exit codes"): 0; 2 for a file that is not a
usable export (it does not parse, has no valid spec, or a tensor does not
fit the spec's model) or a bad option; 1 when the job's data cannot be
read or the device cannot be used.

Plugged into `psctl` by the `psctl.commands` entry points of setup.cfg.
"""
from __future__ import annotations

import json
import math

import click

from worker.cli.common import BadInput


def _finite(value):
    """A number JSON can carry (NaN and infinities are not JSON), else None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


@click.command("evaluate")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@click.option("--data-root", "data_roots", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Read the job's idx:/npz: data only under this directory, relative paths looked up in it, as "
                   "a worker does (repeatable; default: any path, relative to the current directory).")
@click.option("--device", type=click.Choice(["cpu", "gpu", "auto"]), default="cpu", show_default=True,
              help="Where to compute: numpy on the CPU, cupy on a CUDA GPU, or the GPU when usable.")
def evaluate(file, as_json, data_roots, device):
    """Evaluate FILE (from `psctl export`) on its job's test split and print test accuracy and loss."""
    from worker.data import DataError
    from worker.device import DeviceError, select_device
    from worker.export_file import ExportFileError, evaluate_export, read_export

    try:
        spec, tensors, meta = read_export(file)
    except ExportFileError as exc:
        raise BadInput(str(exc)) from None
    try:
        chosen = select_device(device)
    except DeviceError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        figures = evaluate_export(file, spec, tensors, device=chosen, roots=tuple(data_roots) or None)
    except ExportFileError as exc:
        raise BadInput(str(exc)) from None
    except DataError as exc:
        raise click.ClickException(f"{file}: {exc}") from None
    reported = meta.get("result") or {}
    out = {"file": file, "job": meta.get("job"), "state": meta.get("state"), "device": chosen.name,
           "source": spec["data"]["source"], "examples": figures["examples"],
           "test_accuracy": figures["test_accuracy"], "test_loss": _finite(figures["test_loss"]),
           "reported": {k: _finite(reported.get(k)) for k in ("test_accuracy", "test_loss")}}
    if as_json:
        click.echo(json.dumps(out, sort_keys=True))
        return
    click.echo(f"{out['job'] or file}: test accuracy {figures['test_accuracy']:.4f}, "
               f"test loss {figures['test_loss']:.4f} on {figures['examples']:,} test examples of "
               f"{out['source']} ({chosen.name})")
    shown = out["reported"]
    if shown["test_accuracy"] is not None:
        click.echo(f"the job ({out['state']}) reported test accuracy {shown['test_accuracy']:.4f}"
                   + (f", test loss {shown['test_loss']:.4f}" if shown["test_loss"] is not None else ""))
