"""Pieces every `psctl` command shares: sizes, addresses, readiness, signals."""
from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import Callable

import click

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000**2, "MB": 1000**2, "MIB": 1024**2,
          "G": 1000**3, "GB": 1000**3, "GIB": 1024**3, "T": 1000**4, "TB": 1000**4, "TIB": 1024**4}


def parse_size(text: str) -> int:
    """'16MiB' -> 16777216, '4KiB' -> 4096, '1000' -> 1000; ValueError otherwise."""
    m = _SIZE_RE.match(str(text))
    unit = (m.group(2) or "").upper() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 4KiB, 16MiB, 1GB)")
    return int(float(m.group(1)) * _UNITS[unit])


class SizeParam(click.ParamType):
    """A byte count with an optional unit, for click options."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeParam()
TCP_RE = re.compile(r"^(tcp://([^:/\s]+|\[[0-9a-fA-F:]+\]):(\d+|\*)|ipc://\S+|inproc://\S+)$")


def check_address(addr: str, what: str) -> str:
    """`addr` if it is a ZeroMQ endpoint we can use, else a one-sentence ClickException."""
    if not TCP_RE.match(addr or ""):
        raise click.ClickException(f"{what} {addr!r} is not an address like tcp://127.0.0.1:5555")
    m = re.match(r"^tcp://.*:(\d+)$", addr)
    if m and not 0 <= int(m.group(1)) <= 65535:
        raise click.ClickException(f"{what} {addr!r} has port {m.group(1)}, outside 0-65535")
    return addr


def scheduler_address(option: str | None, *, required: bool = True) -> str | None:
    """The scheduler's address: --scheduler, else PSCLUSTER_SCHEDULER, else the DMLC variables.

    ps-lite, MXNet and BytePS users already set DMLC_PS_ROOT_URI and
    DMLC_PS_ROOT_PORT; they mean the same thing here.
    """
    addr = option or os.environ.get("PSCLUSTER_SCHEDULER")
    if not addr and os.environ.get("DMLC_PS_ROOT_URI"):
        port = os.environ.get("DMLC_PS_ROOT_PORT", "")
        if not port.isdigit():
            raise click.ClickException(f"DMLC_PS_ROOT_PORT must be a port number, found {port!r}")
        addr = f"tcp://{os.environ['DMLC_PS_ROOT_URI']}:{port}"
    if not addr:
        if required:
            raise click.ClickException(
                "no scheduler address: pass --scheduler tcp://HOST:PORT or set PSCLUSTER_SCHEDULER")
        return None
    return check_address(addr, "scheduler address")


def serve_metrics_or_fail(registry, port: int | None, host: str, on_fail: Callable[[], None]) -> int | None:
    """Start a daemon's metrics exporter; its port, None when not asked, or a one-sentence error."""
    if port is None:
        return None
    from ps.metrics_http import serve_metrics

    try:
        return serve_metrics(registry, port, host).server_address[1]
    except OSError as exc:
        on_fail()
        raise click.ClickException(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None


def announce_ready(**facts) -> None:
    """Print the readiness line tests and `psctl run` wait for: `READY {json}`."""
    sys.stdout.write("READY " + json.dumps(facts, sort_keys=True) + "\n")
    sys.stdout.flush()


def on_stop_signals(stop: Callable[[], None]) -> None:
    """Call `stop` on SIGTERM and SIGINT so the daemon closes its sockets and exits 0."""
    def handler(signum, frame):
        stop()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
