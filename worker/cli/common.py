"""Command-line pieces the worker-side commands share (conventions: protocol/endpoints.py)."""
from __future__ import annotations

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
