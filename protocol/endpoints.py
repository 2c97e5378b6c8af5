"""Conventions every pscluster process agrees on outside the messages themselves.

Pure functions, shared by the command lines of both sides (ps/cli and
worker/cli, which may not import each other): what an address looks like,
where the scheduler's address comes from, how a byte size is written, the
one readiness line a daemon prints when it serves, and where a daemon
listens and what address it gives others when it runs across machines
(README.md, "Running a cluster"). Looking things up on the machine (an
interface's address, the route to the scheduler) is ps/hosts.py's; the
rules here get those look-ups passed in. Errors are ValueError with one
sentence; the command lines turn them into usage errors.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Protocol

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


NO_SCHEDULER = ("no scheduler address: pass --scheduler tcp://HOST:PORT, or set PSCLUSTER_SCHEDULER "
                "(or DMLC_PS_ROOT_URI and DMLC_PS_ROOT_PORT)")


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


def check_protected(addr: str, what: str, *, curve: bool, insecure: bool, implied_by: str | None = None) -> str:
    """Protected mode: without CURVE a daemon listens on loopback only, unless told --insecure.

    Returns `addr`; ValueError (one sentence naming --curve-dir and --insecure) otherwise.
    `implied_by` says why `addr` was chosen when the user gave no address
    (a launch across machines), so the refusal can say what such a launch needs.
    """
    if curve or insecure or is_loopback(addr):
        return addr
    if implied_by:
        raise ValueError(f"{what} defaults to {addr} because {implied_by}, and across machines nothing would check "
                         "who connects: a launch across machines needs --curve-dir DIR (keys from psctl keys "
                         "generate, or PSCLUSTER_CURVE_DIR) or --insecure on a network you trust; on one machine "
                         "pass --bind tcp://127.0.0.1:PORT")
    raise ValueError(f"{what} {addr} is reachable from other machines and nothing would check who connects: "
                     "pass --curve-dir DIR (keys from psctl keys generate), or --insecure on a network you trust")


# --- across machines: where a daemon listens, what it advertises ------------------------------

LOOPBACK_HOST = "127.0.0.1"
ALL_INTERFACES_HOST = "0.0.0.0"
# Hosts that mean "every interface" in a bind (ZeroMQ reports tcp://*:P as tcp://0.0.0.0:P).
WILDCARD_HOSTS = frozenset({"0.0.0.0", "*", "::", "[::]", "[::0]", "[0:0:0:0:0:0:0:0]"})
_TCP_RE = re.compile(r"^tcp://(.+):(\d+|\*)$")
_HOST_RE = re.compile(r"^([A-Za-z0-9_.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]|[0-9A-Fa-f:.]{2,45})$")


def tcp_host_port(addr: str) -> tuple[str, str] | None:
    """('10.0.0.5', '6000') for tcp://10.0.0.5:6000 (IPv6 hosts keep their brackets); None if not tcp."""
    m = _TCP_RE.match(addr or "")
    return (m.group(1), m.group(2)) if m else None


def is_wildcard(addr: str) -> bool:
    """True for a bind on every interface: tcp://0.0.0.0:P, tcp://*:P, tcp://[::]:P."""
    hp = tcp_host_port(addr)
    return hp is not None and hp[0] in WILDCARD_HOSTS


def _bracketed(host: str) -> str:
    """An IPv6 literal in brackets, as an endpoint writes it; other hosts as they are."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def host_of(value: str, what: str) -> str:
    """The host of 'HOST', 'HOST:PORT', '[V6]:PORT' or 'tcp://HOST:PORT' (DMLC_NODE_HOST, --advertise)."""
    text = value.strip()
    hp = tcp_host_port(text)
    if hp is not None:
        host = hp[0]
    elif text.count(":") == 1:
        host = text.split(":", 1)[0]
    elif text.startswith("[") and "]:" in text:
        host = text[:text.index("]") + 1]
    else:
        host = text
    if not _HOST_RE.fullmatch(host) or host in WILDCARD_HOSTS:
        raise ValueError(f"{what} {value!r} is not a host name or address others can connect to")
    return _bracketed(host)


def with_port(addr: str, bound: str) -> str:
    """`addr` with port 0 (or *) replaced by the port of `bound`, the endpoint really bound."""
    hp, bound_hp = tcp_host_port(addr), tcp_host_port(bound)
    if hp is None or bound_hp is None or hp[1] not in ("0", "*"):
        return addr
    return f"tcp://{hp[0]}:{bound_hp[1]}"


def server_bind(option: str | None, scheduler: str | None) -> tuple[str, str | None]:
    """Where a server listens, and why when --bind was not given (for the protected-mode refusal).

    With a scheduler on another machine a server must be reachable from
    there: every interface, a free port. Otherwise loopback, a free port.
    """
    if option:
        return option, None
    if scheduler and not is_loopback(scheduler):
        return f"tcp://{ALL_INTERFACES_HOST}:0", f"the scheduler {scheduler} is not on loopback"
    return f"tcp://{LOOPBACK_HOST}:0", None


def scheduler_bind(option: str | None, environ: Mapping[str, str] = os.environ) -> tuple[str, str | None]:
    """Where the scheduler listens, and why when --bind was not given.

    ps-lite's DMLC_PS_ROOT_PORT: that port, on every interface (others reach
    the scheduler at DMLC_PS_ROOT_URI), or on loopback when DMLC_PS_ROOT_URI
    is a loopback address (a launch on one machine). Otherwise loopback, a free port.
    """
    if option:
        return option, None
    port = environ.get("DMLC_PS_ROOT_PORT", "")
    if not port.isdigit():
        return f"tcp://{LOOPBACK_HOST}:0", None
    uri = environ.get("DMLC_PS_ROOT_URI", "").strip()
    if uri and is_loopback(f"tcp://{_bracketed(uri)}:{port}"):
        return f"tcp://{LOOPBACK_HOST}:{port}", None
    why = f"DMLC_PS_ROOT_URI={uri} is not loopback" if uri else "DMLC_PS_ROOT_PORT is set without DMLC_PS_ROOT_URI"
    return f"tcp://{ALL_INTERFACES_HOST}:{port}", why


def metrics_host(listens: str | None) -> str:
    """Where a daemon's metrics port listens unless --metrics-host says: loopback when the daemon is
    loopback-only (`listens`: its bind; a worker's: its scheduler), else every interface."""
    return LOOPBACK_HOST if not listens or is_loopback(listens) else ALL_INTERFACES_HOST


class HostLookups(Protocol):
    """What advertise_address may look up on the machine (ps/hosts.py does it)."""

    def interface_address(self, name: str) -> str:
        """The IPv4 address of interface `name`; ValueError (one sentence) if it has none."""

    def route_to(self, host: str, port: int) -> str | None:
        """This machine's address on the route to host:port; None if there is none."""

    def hostname(self) -> str:
        """This machine's host name."""


def advertise_address(bind: str, *, advertise: str | None = None, scheduler: str | None = None,
                      environ: Mapping[str, str] = os.environ, lookups: HostLookups) -> str:
    """The address a server gives the scheduler, and through it the workers.

    In order: `advertise` (--advertise: an endpoint, or a bare host that
    takes the bind's port); a bind on one address: that address; a bind on
    every interface: the host of DMLC_NODE_HOST, else the IPv4 address of
    the interface DMLC_INTERFACE, else this machine's address on the route
    to the scheduler, else its host name (ps-lite's rules). A port of 0 is
    left for with_port to replace by the port really bound. ValueError for
    a malformed --advertise or DMLC_NODE_HOST or an interface without an address.
    """
    hp = tcp_host_port(bind)
    port = hp[1] if hp else "0"
    if advertise:
        if "://" in advertise:
            return check_endpoint(advertise, "--advertise")
        return f"tcp://{host_of(advertise, '--advertise')}:{port}"
    if not is_wildcard(bind):
        return bind
    node_host = environ.get("DMLC_NODE_HOST", "").strip()
    interface = environ.get("DMLC_INTERFACE", "").strip()
    if node_host:
        host = host_of(node_host, "DMLC_NODE_HOST")
    elif interface:
        host = lookups.interface_address(interface)
    else:
        host = None
        sched = tcp_host_port(scheduler) if scheduler else None
        if sched is not None and sched[1].isdigit():
            host = lookups.route_to(sched[0].strip("[]"), int(sched[1]))
        if not host or host in WILDCARD_HOSTS:
            host = lookups.hostname()
    return f"tcp://{_bracketed(host)}:{port}"
