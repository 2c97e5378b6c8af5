"""`psctl`: one command line for every daemon and every user action.

Thin by design: click parses, the command builds the
object and runs it. Bad input becomes a one-sentence `click.ClickException`.

Exit codes, the same for every command (README.md, "Exit codes"): 0
success; 1 a job failed, or the command did (a refusal, a silent
scheduler); 2 a usage error (click's own, and the worker side's one-sentence
BadInput in worker/cli/common.py: a bad address, file or option); 130
interrupted (Ctrl-C: `Psctl.invoke` below, instead of click's "Aborted!"
and 1); 143 terminated (SIGTERM, for the commands that clean up first:
`psctl run`, `submit --wait`, `wait`; the daemons stop cleanly on SIGTERM
and exit 0).

This package holds the command group and the server-side daemons
(scheduler, server, start). The commands that need worker code (the worker
daemon, submit/status/list/cancel/export, run, train-local, the
benchmarks) live in worker/cli and are plugged in by name through the
entry-point groups `psctl.commands` and `psctl.bench` of setup.cfg, loaded
only when asked for: ps/ and worker/ never import each other (README.md,
"Architecture"). What a worker-side command needs from this side (the servers'
optimizer code, for train-local) is handed over in the click context.
"""
from __future__ import annotations

from importlib.metadata import entry_points

import click


class PluginGroup(click.Group):
    """A click group whose commands are its own plus those of an entry-point group."""

    def __init__(self, *args, plugins: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.plugins = plugins

    def _entry_points(self) -> dict:
        return {ep.name: ep for ep in entry_points(group=self.plugins)}

    def list_commands(self, ctx) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._entry_points()))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None and name in self._entry_points():
            command = self._entry_points()[name].load()  # imports the plugin module now, not before
            self.add_command(command, name)
        return command


EXIT_INTERRUPTED = 130  # 128 + SIGINT


class Psctl(PluginGroup):
    """The `psctl` group: Ctrl-C ends any command with exit 130 (143 for an interrupt that says so)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            # A command that cleans up on SIGTERM raises a KeyboardInterrupt with exit_code 143
            # (worker/cli/common.py `Terminated`); plain Ctrl-C is 130. A new line after the terminal's ^C.
            click.echo(err=True)
            raise SystemExit(getattr(exc, "exit_code", EXIT_INTERRUPTED)) from None


def updater_factory(spec: dict):
    """For train-local: the servers' optimizer as `make(arrays, nonlearned, optimizer) -> Updater`.

    `spec` (an optimizer spec) is checked at once (ValueError on a bad one);
    `make` builds from the optimizer spec it is given, which the trainer
    completes (a cosine schedule's length, once the data size is known).
    """
    from ps.optim import Updater, make_optimizer

    make_optimizer(spec)
    return lambda arrays, nonlearned, optimizer: Updater(make_optimizer(optimizer), arrays, nonlearned=nonlearned)


@click.group(cls=Psctl, plugins="psctl.commands", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pscluster")
@click.pass_context
def main(ctx) -> None:
    """pscluster: a parameter-server cluster for data-parallel training."""
    ctx.ensure_object(dict)["updater_factory"] = updater_factory


@main.group(cls=PluginGroup, plugins="psctl.bench")
def bench() -> None:
    """Benchmarks; each prints a ratio against a limit measured in the same run."""


def _register() -> None:
    from ps.cli.cmd_keys import keys
    from ps.cli.cmd_scheduler import scheduler
    from ps.cli.cmd_server import server
    from ps.cli.cmd_start import start

    for command in (keys, scheduler, server, start):
        main.add_command(command)


_register()
