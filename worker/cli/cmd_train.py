"""`psctl train-local JOB.yaml`: train a job in this one process, no cluster.

The single-process reference trainer (worker.trainer.LocalTrainer) with
the servers' optimizer code applied locally (the `psctl` group hands it
over in the click context, as `updater_factory`): what one worker
of the cluster computes, with the same model, data order and update math.
Handy to check a job file and its hyper-parameters before submitting it,
and the yardstick the cluster's accuracy is compared with.

Plugged into `psctl` by the `psctl.commands` entry points of setup.cfg.
"""
from __future__ import annotations

import json
import math

import click

from worker.views.progress import ProgressLine


def _finite_or_none(value):
    return value if isinstance(value, (int, str)) or (value is not None and math.isfinite(value)) else None


def _load_spec(job_file: str, steps: int | None) -> dict:
    from protocol.jobspec import SpecError, load_job_file, validate_job

    try:
        spec = load_job_file(job_file)
        if steps is not None:
            # Re-validate with the override so derived fields (a cosine
            # schedule's total_steps) follow the new step count.
            import yaml

            with open(job_file, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh)
            raw["steps"] = steps
            raw.pop("epochs", None)
            spec = validate_job(raw)
    except SpecError as exc:
        raise click.ClickException(str(exc)) from None
    return spec


@click.command("train-local")
@click.argument("job_file", metavar="JOB.yaml")
@click.option("--device", type=click.Choice(["cpu", "gpu", "auto"]), default="cpu", show_default=True,
              help="Where to compute: numpy on the CPU, cupy on a CUDA GPU, or the GPU when usable.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Train this many steps instead of the job's steps/epochs.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No live progress line on stderr.")
def train_local(job_file: str, device: str, steps: int | None, as_json: bool, quiet: bool) -> None:
    """Train JOB.yaml in this process (one worker's share, no cluster) and report test accuracy.

    Uses the job's model, data, optimizer and seed; `workers` and
    `consistency` are ignored (this is one worker with a local server).
    Progress goes to stderr, the summary (or --json) to stdout. Exits
    non-zero on a bad job file, an unusable device, or a diverged run.
    """
    spec = _load_spec(job_file, steps)

    from worker.data import DataError
    from worker.device import DeviceError
    from worker.trainer import LocalTrainer, total_steps

    # The servers' optimizer code, handed over by the `psctl` group (ps/cli):
    # worker/ stays independent of the server side, yet the reference run must use that code.
    updaters = (click.get_current_context().find_object(dict) or {}).get("updater_factory")
    if updaters is None:
        raise click.ClickException("train-local needs the servers' optimizers: run it as `psctl train-local`")
    try:
        make_updater = updaters(spec["optimizer"])
    except ValueError as exc:
        raise click.ClickException(f"{job_file}: {exc}") from None

    progress = None
    try:
        trainer = LocalTrainer(spec, update=make_updater, device=device)
    except DeviceError as exc:
        raise click.ClickException(str(exc)) from None
    except DataError as exc:
        raise click.ClickException(f"{job_file}: {exc}") from None
    except ValueError as exc:  # a model that does not fit the data (e.g. a cnn on flat features)
        raise click.ClickException(f"{job_file}: {exc}") from None
    if not quiet:
        progress = ProgressLine(total_steps(spec, len(trainer.train_set)))
        trainer.progress = progress
    try:
        result = trainer.run()
    finally:
        if progress is not None:
            progress.close()

    summary = {"job": spec["name"], "device": trainer.device.name, **result.summary()}
    if as_json:
        click.echo(json.dumps({k: _finite_or_none(v) for k, v in summary.items()}))
    else:
        why = {"target": f", stopped at target_accuracy {spec['target_accuracy']}",
               "diverged": ", stopped: the loss is no longer finite"}.get(result.stopped, "")
        click.echo(f"{spec['name']}: test accuracy {result.test_accuracy:.4f} (loss {result.test_loss:.4f}) "
                   f"after {result.steps} steps in {result.wall_s:.1f} s on {trainer.device.name}, "
                   f"{result.examples_per_s:,.0f} examples/s; final training loss {result.final_loss:.4f}{why}")
    if result.stopped == "diverged":
        raise click.ClickException(
            f"training diverged at step {result.steps} (loss {result.final_loss}); "
            f"try a smaller optimizer.lr or clip_norm > 0")
