"""Conventions every pscluster process agrees on outside the messages themselves.

Pure functions, shared by the command lines of both sides (ps/cli and
worker/cli, which may not import each other): what an address looks like,
where the scheduler's address comes from, how a byte size is written, and
the one readiness line a daemon prints when it serves. Errors are
ValueError with one sentence; the command lines turn them into usage errors.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

# The line a daemon prints on stdout once it serves; scripts wait for it.
READY_PREFIX = "READY "

_ENDPOINT_RE = re.compile(r"^(tcp://([^:/\s]+|\[[0-9a-fA-F:]+\]):(\d+|\*)|ipc://\S+|inproc://\S+)$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000**2, "MB": 1000**2, "MIB": 1024**2,
          "G": 1000**3, "GB": 1000**3, "GIB": 1024**3, "T": 1000**4, "TB": 1000**4, "TIB": 1024**4}


def parse_size(text: str | int) -> int:
    """'16MiB' -> 16777216, '4KiB' -> 4096, '1000' -> 1000; ValueError otherwise."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    unit = (m.group(2) or "").upper() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 4KiB, 16MiB, 1GB)")
    return int(float(m.group(1)) * _UNITS[unit])


def check_endpoint(addr: str, what: str) -> str:
    """`addr` if it is a ZeroMQ endpoint we can use; ValueError naming `what` otherwise."""
    if not _ENDPOINT_RE.fullmatch(addr or ""):
        raise ValueError(f"{what} {addr!r} is not an address like tcp://127.0.0.1:5555")
    m = re.match(r"^tcp://.*:(\d+)$", addr)
    if m and not 0 <= int(m.group(1)) <= 65535:
        raise ValueError(f"{what} {addr!r} has port {m.group(1)}, outside 0-65535")
    return addr


def scheduler_endpoint(option: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The scheduler's address: `option`, else PSCLUSTER_SCHEDULER, else the DMLC variables; None if unset.

    ps-lite, MXNet and BytePS users already set DMLC_PS_ROOT_URI and
    DMLC_PS_ROOT_PORT; they mean the same thing here. ValueError for a
    malformed address or port.
    """
    addr = option or environ.get("PSCLUSTER_SCHEDULER")
    if not addr and environ.get("DMLC_PS_ROOT_URI"):
        port = environ.get("DMLC_PS_ROOT_PORT", "")
        if not port.isdigit():
            raise ValueError(f"DMLC_PS_ROOT_PORT must be a port number, found {port!r}")
        addr = f"tcp://{environ['DMLC_PS_ROOT_URI']}:{port}"
    return check_endpoint(addr, "scheduler address") if addr else None


NO_SCHEDULER = "no scheduler address: pass --scheduler tcp://HOST:PORT or set PSCLUSTER_SCHEDULER"


def ready_line(**facts) -> str:
    """The readiness line: `READY {json}` (one line, keys sorted)."""
    return READY_PREFIX + json.dumps(facts, sort_keys=True)


_LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")


def is_loopback(addr: str) -> bool:
    """True for an address only this machine can reach: tcp on 127.0.0.0/8, localhost or ::1, ipc, inproc."""
    if addr.startswith(("ipc://", "inproc://")):
        return True
    m = re.match(r"^tcp://(.+):(\d+|\*)$", addr)
    if not m:
        return False
    host = m.group(1)
    return host in _LOOPBACK_HOSTS or re.fullmatch(r"127\.\d{1,3}\.\d{1,3}\.\d{1,3}", host) is not None


def check_protected(addr: str, what: str, *, curve: bool, insecure: bool) -> str:
    """Protected mode: without CURVE a daemon listens on loopback only, unless told --insecure.

    Returns `addr`; ValueError (one sentence naming --curve-dir and --insecure) otherwise.
    """
    if curve or insecure or is_loopback(addr):
        return addr
    raise ValueError(f"{what} {addr} is reachable from other machines and nothing would check who connects: "
                     "pass --curve-dir DIR (keys from psctl keys generate), or --insecure on a network you trust")
