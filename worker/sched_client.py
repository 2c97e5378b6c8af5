"""A request/reply client for the scheduler (Lazy Pirate), used by workers and `psctl`.

Blocking: `request` sends, waits up to `timeout_s` for the answer, and on
silence re-sends the same request on a fresh socket, `retries` times, then
raises SchedulerUnavailable naming the address and what its host resolved
to. An `error` reply raises SchedulerError with its code and sentence. The
socket comes from worker/transport.py. `resolve_host` tells a host that
does not resolve (SchedulerUnresolvable, at once) from one where nothing
answers (a silence).
"""
from __future__ import annotations

import itertools
import re
import socket
import threading
import time

import zmq

from protocol.codec import decode, encode, raise_if_error
from protocol.errors import ProtocolError
from protocol.keys import ClientKeys
from protocol.messages import Message, Ok
from worker.transport import connect_dealer, recv_message, send_message

REQUEST_TIMEOUT_S = 5.0
REQUEST_RETRIES = 2


class SchedulerUnavailable(ConnectionError):
    """The scheduler did not answer."""


class SchedulerUnresolvable(SchedulerUnavailable):
    """The scheduler address's host name does not resolve."""


def resolve_host(addr: str, *, timeout_s: float = REQUEST_TIMEOUT_S) -> list[str]:
    """The IP addresses the host of a tcp:// address resolves to ([] for ipc:// and inproc://).

    Raises SchedulerUnresolvable when it does not resolve, or when the
    resolver gives no answer within `timeout_s` (the lookup goes on in a
    daemon thread, which cannot hold the process).
    """
    m = re.match(r"^tcp://(\[[0-9a-fA-F:]+\]|[^:/\s]+):(\d+|\*)$", addr)
    if not m or m.group(1) == "*":
        return []
    host = m.group(1).strip("[]")
    box: dict = {}

    def lookup() -> None:
        try:
            box["ips"] = sorted({info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})
        except (OSError, UnicodeError) as exc:
            box["error"] = exc

    thread = threading.Thread(target=lookup, name="resolve-scheduler", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "ips" in box:
        return box["ips"]
    why = "" if "error" in box else f" within {timeout_s:g}s"
    raise SchedulerUnresolvable(f"cannot resolve host {host}{why} (scheduler address {addr})")


def _silence(addr: str, op: str, timeout_s: float, retries: int, curve: bool) -> str:
    """The sentence for a scheduler that did not answer: where, how long, and what the host resolved to."""
    try:
        ips = resolve_host(addr, timeout_s=1.0)
    except SchedulerUnresolvable as exc:
        return f"no answer from the scheduler at {addr} to '{op}': {exc}"
    tries = f" ({retries} retries)" if retries else ""
    resolved = f"the host resolved to {', '.join(ips)}; " if ips else ""
    ask = "is the scheduler running, and does it hold your key?" if curve else "is the scheduler running?"
    return f"no answer from the scheduler at {addr} to '{op}' within {timeout_s:g}s{tries} ({resolved}{ask})"


class SchedulerError(RuntimeError):
    """The scheduler refused a request; `code` and `reason` say why."""

    def __init__(self, exc: ProtocolError):
        super().__init__(exc.message)
        self.code = exc.code
        self.reason = exc.message


class SchedulerClient:
    """One DEALER to the scheduler; one request at a time. Not thread-safe."""

    def __init__(self, addr: str, *, ctx: zmq.Context | None = None, worker: str = "",
                 timeout_s: float = REQUEST_TIMEOUT_S, retries: int = REQUEST_RETRIES, keys: ClientKeys | None = None):
        self.addr = addr
        self.keys = keys  # CURVE: this process's pair and the scheduler's public key
        self.ctx = ctx or zmq.Context.instance()
        self.worker = worker
        self.timeout_s = timeout_s
        self.retries = retries
        self._rids = itertools.count(1)
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = connect_dealer(self.ctx, self.addr, keys=self.keys)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def request(self, msg: Message, *, timeout_s: float | None = None, retries: int | None = None) -> Ok:
        """Send `msg` (rid and worker filled in) and return the `ok` reply."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        retries = self.retries if retries is None else retries
        rid = next(self._rids)
        frames = encode(type(msg)(**{**msg.__dict__, "rid": rid, "worker": msg.worker or self.worker}))
        for _attempt in range(retries + 1):
            sock = self._socket()
            send_message(sock, frames)
            deadline = time.monotonic() + timeout_s
            while sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                reply = decode(recv_message(sock))
                if reply.rid != rid:
                    continue  # an answer to an earlier, abandoned request
                try:
                    return raise_if_error(reply)
                except ProtocolError as exc:
                    raise SchedulerError(exc) from None
            self.close()  # Lazy Pirate: a fresh socket for the retry
        raise SchedulerUnavailable(_silence(self.addr, msg.OP, timeout_s, retries, self.keys is not None))
