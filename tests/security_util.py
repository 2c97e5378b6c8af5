"""Keys and raw CURVE clients for the security tests (tests/test_security*.py).

Keys are made the way an operator makes them (`psctl keys generate`) and
read back with pyzmq's own certificate reader, not the product's. Clients
are bare DEALER sockets: CURVE options set by hand before connect, a
bounded wait on every receive.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from protocol.codec import decode, encode
from protocol.messages import Error, Message
from tests.procs import run_psctl

REPLY_TIMEOUT_S = 10.0       # longest wait for an answer that must come
NO_REPLY_S = 2.0             # how long a client that must get no answer is listened to


@dataclass
class CurveDir:
    """A --curve-dir made with `psctl keys generate`."""

    dir: Path

    @classmethod
    def generate(cls, directory: Path, keys: list[tuple[str, str | None]]) -> CurveDir:
        """`psctl keys generate DIR --role ROLE [--name NAME]` for each (role, name)."""
        for role, name in keys:
            result = run_psctl("keys", "generate", str(directory), "--role", role,
                               *(["--name", name] if name else []), timeout=60)
            assert result.returncode == 0, result.stderr
            assert (directory / role / f"{name or role}.key").exists()
            assert (directory / role / f"{name or role}.key_secret").stat().st_mode & 0o077 == 0
        return cls(directory)

    def pair(self, role: str, name: str | None = None) -> tuple[bytes, bytes]:
        """(public, secret) z85 keys of ROLE/NAME (NAME defaults to the role)."""
        public, secret = zmq.auth.load_certificate(self.dir / role / f"{name or role}.key_secret")
        return public, secret

    def public(self, role: str, name: str | None = None) -> bytes:
        return zmq.auth.load_certificate(self.dir / role / f"{name or role}.key")[0]

    @property
    def scheduler_public(self) -> bytes:
        return self.public("scheduler")


def curve_dealer(ctx: zmq.Context, addr: str, pair: tuple[bytes, bytes] | None = None,
                 server: bytes | str | None = None) -> zmq.Socket:
    """A DEALER to `addr`; with `pair`, a CURVE client of the daemon whose public key is `server`."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(REPLY_TIMEOUT_S * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(REPLY_TIMEOUT_S * 1000))
    sock.setsockopt(zmq.SNDHWM, 10_000)
    if pair is not None:
        sock.curve_publickey, sock.curve_secretkey = pair
        sock.curve_serverkey = server.encode("ascii") if isinstance(server, str) else server
    sock.connect(addr)
    return sock


def ask(sock: zmq.Socket, msg: Message, timeout_s: float = REPLY_TIMEOUT_S) -> Message:
    """Send `msg` and return the answer to it (answers to other request ids are skipped)."""
    sock.send_multipart(encode(msg))
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(max(1, int(left * 1000))):
            break
        reply = decode(sock.recv_multipart(zmq.NOBLOCK))
        if reply.rid == msg.rid:
            return reply
    raise AssertionError(f"no answer to {msg.OP} (rid {msg.rid}) within {timeout_s:g}s")


def no_reply(socks: list[zmq.Socket], wait_s: float = NO_REPLY_S) -> set:
    """The sockets of `socks` on which anything arrives within `wait_s` (all listened to at once)."""
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    answered: set = set()
    deadline = time.monotonic() + wait_s
    while (left := deadline - time.monotonic()) > 0:
        for sock, _ in poller.poll(max(1, int(left * 1000))):
            answered.add(sock)
            sock.recv_multipart(zmq.NOBLOCK)
    return answered


def assert_forbidden(reply: Message, msg: Message, *codes: str) -> None:
    """`reply` is the `forbidden` refusal of `msg` (or one of `codes`), naming its request id."""
    want = codes or ("forbidden",)
    assert isinstance(reply, Error) and reply.code in want and reply.rid == msg.rid, (
        f"{msg.OP} {_show(msg)}: expected {' or '.join(want)}, got {reply}")


def _show(msg: Message) -> str:
    fields = {k: v for k, v in msg.__dict__.items() if k not in ("slices",) and v not in ("", -1, [], {}, ())}
    return str(fields)[:300]
