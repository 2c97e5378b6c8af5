"""Command-line pieces the worker-side commands share (conventions: protocol/endpoints.py)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import click

from protocol.endpoints import NO_SCHEDULER, check_endpoint, parse_size, ready_line, scheduler_endpoint


def as_usage_error(fn, *args):
    """fn(*args), with its ValueError turned into a one-sentence ClickException."""
    try:
        return fn(*args)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def sizes_option(ctx, param, value):
    """click callback for byte counts (4096, 4KiB, 16MiB), one value or several."""
    try:
        return tuple(parse_size(v) for v in value) if isinstance(value, tuple) else parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def scheduler_address(option: str | None) -> str:
    """--scheduler, PSCLUSTER_SCHEDULER or the DMLC variables; a usage error when none is set."""
    addr = as_usage_error(scheduler_endpoint, option)
    if addr is None:
        raise click.ClickException(NO_SCHEDULER)
    return addr


def check_address(addr: str, what: str) -> str:
    return as_usage_error(check_endpoint, addr, what)


def announce_ready(**facts) -> None:
    """Print the readiness line scripts and tests wait for."""
    click.echo(ready_line(**facts))


def load_keys(curve_dir: str | None, role: str, key_name: str | None):
    """This process's CurveKeys from --curve-dir (None without), or a one-sentence ClickException."""
    if not curve_dir:
        return None
    from protocol.keys import KeyFileError
    from worker.client import CurveKeys

    try:
        return CurveKeys.load(curve_dir, role, key_name)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None


def curve_client_options(fn):
    """--curve-dir and --key-name for a process that connects to the cluster (README.md, "Security")."""
    fn = click.option("--key-name", default=None,
                      help="Which of the role's keys in --curve-dir to use (default: the only one).")(fn)
    fn = click.option("--curve-dir", type=click.Path(file_okay=False), default=None, envvar="PSCLUSTER_CURVE_DIR",
                      help="CURVE keys (psctl keys generate); or PSCLUSTER_CURVE_DIR.")(fn)
    return fn


@dataclass(frozen=True)
class Connection:
    """Where the scheduler is and, with CURVE, the keys to reach it with."""

    scheduler: str
    keys: object = None   # worker.client.CurveKeys

    def client(self, **kwargs):
        from worker.sched_client import SchedulerClient

        keys = self.keys.to(self.keys.scheduler) if self.keys is not None else None
        return SchedulerClient(self.scheduler, keys=keys, **kwargs)


def admin_connection(fn):
    """--scheduler, --curve-dir and --key-name, given to the command as `conn` (a Connection with admin keys)."""
    @functools.wraps(fn)
    def wrapper(*args, scheduler, curve_dir, key_name, **kwargs):
        return fn(*args, conn=Connection(scheduler_address(scheduler), load_keys(curve_dir, "admin", key_name)),
                  **kwargs)

    wrapper = curve_client_options(wrapper)
    return click.option("--scheduler", default=None,
                        help="Scheduler address (or PSCLUSTER_SCHEDULER, or DMLC_PS_ROOT_URI/PORT).")(wrapper)
