"""`psctl`: one command line for every daemon and every user action.

Thin by design (STYLE.md, habit 12): click parses, the command builds the
object and runs it. Bad input becomes a one-sentence `click.ClickException`.
Commands import `worker` lazily, inside their functions, so `ps` stays
importable without it.
"""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pscluster")
def main() -> None:
    """pscluster: a parameter-server cluster for data-parallel training."""


@main.group()
def bench() -> None:
    """Benchmarks; each prints a ratio against a limit measured in the same run."""


def _register() -> None:
    # Each command lives in its own module; they import heavy code lazily.
    from ps.cli.cmd_bench_consistency import consistency
    from ps.cli.cmd_bench_nn import nn
    from ps.cli.cmd_bench_pushpull import pushpull
    from ps.cli.cmd_jobs import cancel, export, list_jobs, status, submit
    from ps.cli.cmd_run import run
    from ps.cli.cmd_scheduler import scheduler
    from ps.cli.cmd_server import server
    from ps.cli.cmd_start import start
    from ps.cli.cmd_train import train_local
    from ps.cli.cmd_worker import worker

    for command in (scheduler, server, worker, start, submit, status, list_jobs, cancel, export, run, train_local):
        main.add_command(command)
    for command in (pushpull, nn, consistency):
        bench.add_command(command)


_register()
