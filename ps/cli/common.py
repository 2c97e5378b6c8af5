"""Command-line pieces the server-side commands share: addresses, sizes, readiness, signals.

The conventions themselves are in protocol/endpoints.py (shared with
worker/cli); this turns their ValueErrors into one-sentence usage errors.
"""
from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import click

from protocol.endpoints import check_endpoint, parse_size, ready_line, scheduler_endpoint


def size_option(ctx, param, value):
    """click callback: a byte count such as 4096, 4KiB or 512MiB (None stays None)."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def check_address(addr: str, what: str) -> str:
    """`addr` if it is a usable ZeroMQ endpoint, else a one-sentence ClickException."""
    try:
        return check_endpoint(addr, what)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def scheduler_address(option: str | None) -> str | None:
    """--scheduler, PSCLUSTER_SCHEDULER or the DMLC variables; None when none is set."""
    try:
        return scheduler_endpoint(option)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def serve_metrics_or_fail(registry, health, port: int | None, host: str, on_fail: Callable[[], None]) -> int | None:
    """Start a daemon's exporter (/metrics, /healthz); its port, None when not asked, or a one-sentence error."""
    if port is None:
        return None
    from ps.metrics_http import serve_metrics

    try:
        return serve_metrics(registry, health, port, host).server_port
    except OSError as exc:
        on_fail()
        raise click.ClickException(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None


def announce_ready(**facts) -> None:
    """Print the readiness line tests and `psctl run` wait for."""
    sys.stdout.write(ready_line(**facts) + "\n")
    sys.stdout.flush()


def on_stop_signals(stop: Callable[[], None]) -> None:
    """Call `stop` on SIGTERM and SIGINT so the daemon closes its sockets and exits 0."""
    def handler(signum, frame):
        stop()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def curve_options(fn):
    """--curve-dir, --key-name and --insecure for a daemon that listens (README.md, "Security")."""
    fn = click.option("--insecure", is_flag=True,
                      help="Listen beyond loopback without CURVE (only on a network you trust).")(fn)
    fn = click.option("--key-name", default=None,
                      help="Which of the role's keys in --curve-dir is this process's (default: the only one).")(fn)
    fn = click.option("--curve-dir", type=click.Path(file_okay=False), default=None, envvar="PSCLUSTER_CURVE_DIR",
                      help="CURVE keys (psctl keys generate): encrypt every socket and admit only their holders; "
                           "or PSCLUSTER_CURVE_DIR.")(fn)
    return fn


def server_keys(curve_dir: str | None, role: str, key_name: str | None):
    """This daemon's ServerKeys from --curve-dir (None without), or a one-sentence ClickException."""
    if not curve_dir:
        return None
    from protocol.keys import KeyFileError, KeyRing, ServerKeys

    try:
        ring = KeyRing(curve_dir)
        _identity, public, secret = ring.own(role, key_name)
        ring.scheduler_key()  # every daemon talks to the scheduler: its key must be there
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    return ServerKeys(public, secret, ring)


def protected_bind(addr: str, *, curve_dir: str | None, insecure: bool, log, implied_by: str | None = None) -> str:
    """`addr` if protected mode allows it (loopback, or CURVE, or --insecure); else a usage error.

    `implied_by`: why `addr` was chosen when --bind was not given (a launch across machines).
    """
    from protocol.endpoints import check_protected, is_loopback

    try:
        check_protected(addr, "--bind", curve=bool(curve_dir), insecure=insecure, implied_by=implied_by)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if insecure and not curve_dir and not is_loopback(addr):
        log.warning("listening beyond loopback without CURVE (--insecure): anyone who reaches it owns the cluster",
                    extra={"addr": addr})
    return addr
