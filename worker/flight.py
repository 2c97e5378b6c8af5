"""Requests in flight to a job's shards: a window per shard, replies as they come, Lazy Pirate.

The parameter client (worker/client.py) cuts every request into messages
under its piece bound; this engine keeps up to `window` of them in flight
to each shard, in order, and sends the next one as a reply comes back, so
a shard receives (and holds) at most a window of pieces at a time, while
the other shards' pieces and replies are on the way. Each reply goes to a
sink as it arrives (its slices are copied into the caller's arrays there).

Lazy Pirate: when the oldest request in flight to a shard is not answered
within `timeout_s`, the shard's socket is replaced and every request in
flight to it is sent again, in order, with the same request ids; shards
answer repeats without applying them twice (a repeated piece is skipped:
ps/pieces.py; a repeated last piece or parked pull is answered again).
After `retries` tries (or `max_wait_s` for a request a policy may hold on
purpose) ShardTimeout names the shard. With `resolve`, a shard restarted at
another address is followed: its requests go there at once.

Not thread-safe; one Flight per call of the client.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from protocol.codec import decode, encode, raise_if_error
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import Message, Ok
from worker.transport import recv_message, send_message

# While replies are awaited, how often `resolve` is asked whether a shard moved.
ADDRESS_CHECK_INTERVAL_S = 0.5
# Plain int: pyzmq's flag enums cost a microsecond per use on the data path.
_POLLIN = int(zmq.POLLIN)


class ShardTimeout(TimeoutError):
    """A shard did not answer in time; the message names it."""


class ShardError(RuntimeError):
    """A shard answered with an error reply."""

    def __init__(self, shard: int, addr: str, exc: ProtocolError):
        super().__init__(f"shard {shard} at {addr} refused the request: {exc.code.value}: {exc.message}")
        self.shard = shard
        self.code = exc.code
        self.reason = exc.message


@dataclass
class _Request:
    msg: Message
    frames: list
    patient: bool          # a policy may hold it on purpose (a clocked pull)
    deadline: float = 0.0


@dataclass
class _Lane:
    """One shard's requests: waiting to be sent, and in flight (oldest first)."""

    queue: deque = field(default_factory=deque)
    flying: dict = field(default_factory=dict)   # rid -> _Request, in send order
    tries: int = 0                                # re-sends of the oldest in flight


class Flight:
    """Requests to several shards, a window of them in flight per shard."""

    def __init__(self, client, *, window: int, sink: Callable[[int, Ok], None] | None = None):
        self.c = client
        self.window = max(1, int(window))
        self.sink = sink
        self.lanes: dict[int, _Lane] = {}
        self.last: dict[int, Ok] = {}   # each shard's latest reply
        self.started = time.monotonic()

    # --- adding ---

    def add(self, k: int, msg: Message, *, patient: bool = False) -> None:
        """Queue `msg` for shard `k` (sent once the window has room, in order)."""
        lane = self.lanes.get(k)
        if lane is None:
            lane = self.lanes[k] = _Lane()
        lane.queue.append(_Request(msg, encode(msg), patient))
        self._fill(k, lane)

    def _fill(self, k: int, lane: _Lane) -> None:
        while lane.queue and len(lane.flying) < self.window:
            req = lane.queue.popleft()
            send_message(self.c._sock(k), req.frames)
            req.deadline = time.monotonic() + self.c.timeout_s
            lane.flying[req.msg.rid] = req

    def throttle(self, queued: int) -> None:
        """Wait (taking replies) while more than `queued` requests wait to be sent: what a caller
        making its requests as it goes holds of them stays bounded."""
        while sum(len(lane.queue) for lane in self.lanes.values()) > queued:
            self.pump(block=True)

    def busy(self) -> bool:
        """Requests wait to be sent or to be answered."""
        return any(lane.flying or lane.queue for lane in self.lanes.values())

    # --- waiting ---

    def wait(self, *, until: Callable[[], bool] | None = None) -> dict[int, Ok]:
        """Run until every request is answered (or `until()` holds); each shard's latest reply."""
        while self.busy() and not (until is not None and until()):
            self.pump(block=True)
        return self.last

    def pump(self, *, block: bool) -> None:
        """Take the replies that are in (waiting for one when `block`), re-send what timed out."""
        waiting = [k for k, lane in self.lanes.items() if lane.flying]
        if not waiting:
            return
        wait_ms = 0
        if block:
            first = min(next(iter(self.lanes[k].flying.values())).deadline for k in waiting)
            wait_ms = max(0, int((first - time.monotonic()) * 1000))
            if self.c.resolve is not None:
                wait_ms = min(wait_ms, int(ADDRESS_CHECK_INTERVAL_S * 1000))
        socks = self.c._socks
        ready = zmq.zmq_poll([(socks[k], _POLLIN) for k in waiting], wait_ms)
        if ready:
            readable = {id(sock) for sock, _events in ready}
            for k in waiting:
                if id(socks[k]) in readable:
                    self._take(k, self.lanes[k])
        if not block:
            return
        now = time.monotonic()
        # A moved shard answers nothing: look for moves only when a wait came back empty.
        for k in self.c._follow_moves(waiting) if not ready else ():
            self._resend(k, self.lanes[k], now)
        for k in waiting:
            lane = self.lanes[k]
            if not lane.flying:
                continue
            oldest = next(iter(lane.flying.values()))
            if now < oldest.deadline:
                continue
            lane.tries += 1
            patient = any(r.patient for r in lane.flying.values())
            if (now - self.started >= self.c.max_wait_s) if patient else lane.tries > self.c.retries:
                raise ShardTimeout(
                    f"shard {k} at {self.c.addrs[k]} did not answer '{oldest.msg.OP}' for job {self.c.job!r} "
                    f"within {now - self.started:.1f}s ({lane.tries - 1} retries)")
            self.c._reset(k)  # Lazy Pirate: a fresh socket, the same requests
            self._resend(k, lane, now, backoff=1 if patient else min(2 ** lane.tries, 8))

    def _resend(self, k: int, lane: _Lane, now: float, backoff: float = 1) -> None:
        for req in lane.flying.values():
            send_message(self.c._sock(k), req.frames)
            req.deadline = now + self.c.timeout_s * backoff

    def _take(self, k: int, lane: _Lane) -> None:
        """Every reply waiting on shard k's socket."""
        sock = self.c._socks[k]
        while sock is not None:
            try:
                frames = recv_message(sock)
            except zmq.Again:
                return
            try:
                reply = raise_if_error(decode(frames))
            except ProtocolError as exc:
                if exc.rid != 0 and exc.rid not in lane.flying:
                    continue  # an answer to an older request on this socket
                raise ShardError(k, self.c.addrs[k], exc) from None
            req = lane.flying.pop(reply.rid, None)
            if req is None:
                continue
            if not isinstance(reply, Ok):
                raise ShardError(k, self.c.addrs[k],
                                 ProtocolError(ErrorCode.BAD_FRAME, f"unexpected reply op {reply.OP}"))
            lane.tries = 0
            self.c._note(k, reply)
            self.last[k] = reply
            if self.sink is not None:
                self.sink(k, reply)
            self._fill(k, lane)
            sock = self.c._socks[k]
