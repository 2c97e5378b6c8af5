"""The scheduler's requests to server shards (membership, checkpoint, drop).

Non-blocking: `request` sends and returns; `poll_sockets` and `on_readable`
fit into the scheduler's one poll loop; `tick` re-sends what timed out on a
fresh socket with the same request id (Lazy Pirate; shards treat membership
by epoch, so a repeat is harmless) and gives up after a few tries. Sockets
are made, sent on and drained by ps/transport.py.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.keys import ServerKeys
from protocol.messages import Error, Message, Ok
from ps.transport import connect_dealer, drain, send_nowait

log = logging.getLogger("pscluster.scheduler")

# A shard that has not answered within this long gets the request again.
SHARD_REQUEST_TIMEOUT_S = 2.0
# Tries before a request is given up (its callback gets None).
SHARD_REQUEST_TRIES = 5


@dataclass
class _Pending:
    addr: str
    frames: list
    op: str
    on_reply: Callable[[Ok | Error | None], None]
    deadline: float
    tries: int = 1


class ShardCalls:
    """One DEALER per shard address, requests in flight, replies to callbacks."""

    def __init__(self, ctx: zmq.Context, keys: ServerKeys | None = None):
        self.ctx = ctx
        self.keys = keys                      # CURVE: the scheduler's own pair (the ring is not needed here)
        self.server_keys: dict[str, str] = {}  # shard address -> its public key
        self.socks: dict[str, zmq.Socket] = {}
        self.pending: dict[int, _Pending] = {}
        self._rids = itertools.count(1)

    def _sock(self, addr: str) -> zmq.Socket:
        sock = self.socks.get(addr)
        if sock is None:
            server = self.server_keys.get(addr, "")
            keys = self.keys.client(server) if self.keys is not None and server else None
            sock = self.socks[addr] = connect_dealer(self.ctx, addr, keys=keys)
        return sock

    def request(self, addr: str, msg: Message, on_reply: Callable, now: float, *, key: str = "") -> None:
        """Send `msg` (its rid is replaced) to the shard at `addr` (CURVE public key `key`);
        `on_reply(reply or None)` later."""
        if key and self.server_keys.get(addr) != key:  # a shard at this address with another key
            self.server_keys[addr] = key
            old = self.socks.pop(addr, None)
            if old is not None:
                old.close(0)
        rid = next(self._rids)
        frames = encode(type(msg)(**{**msg.__dict__, "rid": rid}))
        self.pending[rid] = _Pending(addr, frames, msg.OP, on_reply, now + SHARD_REQUEST_TIMEOUT_S)
        self._send(addr, frames)

    def _send(self, addr: str, frames: list) -> None:
        try:
            send_nowait(self._sock(addr), frames)  # False: the shard is not reading; tick() re-sends
        except zmq.ZMQError as exc:  # an address ZeroMQ cannot use: the request goes unanswered
            log.warning("cannot reach a shard", extra={"addr": addr, "why": exc.strerror})

    def poll_sockets(self) -> list[zmq.Socket]:
        return list(self.socks.values())

    def on_readable(self, sock: zmq.Socket) -> None:
        """Replies waiting on `sock` (a bounded batch) to their callbacks."""
        drain(sock, self._on_reply)

    def _on_reply(self, frames: list) -> None:
        try:
            reply = decode(frames)
        except ProtocolError as exc:
            log.warning("bad reply from a shard", extra={"why": exc.message})
            return
        pending = self.pending.pop(reply.rid, None)
        if pending is not None:
            pending.on_reply(reply)

    def tick(self, now: float) -> None:
        for rid, p in list(self.pending.items()):
            if now < p.deadline:
                continue
            if p.tries >= SHARD_REQUEST_TRIES:
                del self.pending[rid]
                log.warning("shard did not answer", extra={"addr": p.addr, "op": p.op, "tries": p.tries})
                p.on_reply(None)
                continue
            # Lazy Pirate: drop the socket (and whatever it queued), re-send on a fresh one.
            sock = self.socks.pop(p.addr, None)
            if sock is not None:
                sock.close(0)
                for other in self.pending.values():
                    if other.addr == p.addr and other is not p:
                        other.deadline = now  # their replies would have come on the old socket
            p.tries += 1
            p.deadline = now + SHARD_REQUEST_TIMEOUT_S
            self._send(p.addr, p.frames)

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(0)
        self.socks.clear()
