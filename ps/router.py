"""What every ROUTER daemon in `ps/` does the same way: drain, decode, dispatch, refuse.

The shard and the scheduler both inherit `RouterDaemon` and supply `ops`
(op -> handler), `sock` (their bound ROUTER), `metrics` and `ROLE`. A
message is decoded and validated before any handler sees it; a handler
raises ProtocolError to refuse a request; anything else a handler raises is
a bug, answered with an `internal` error while the daemon keeps serving.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import zmq

from protocol.codec import decode, error_frames, sizes
from protocol.errors import ErrorCode, ProtocolError
from protocol.keys import Identity, ServerKeys
from protocol.metrics import MetricsRegistry
from protocol.version import DEFAULT_MAX_MESSAGE_BYTES
from ps.transport import MAX_DRAIN_MSGS, recv_message, send_reply, split_envelope

# Messages handled per wake-up before the loop's periodic work gets a turn.
MAX_BATCH_MSGS = MAX_DRAIN_MSGS
# Plain ints: pyzmq's flag enums cost a microsecond per use on this path.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


# Longest the loop sleeps in poll before the daemon's periodic work (its tick).
TICK_INTERVAL_S = 0.1


def sender(frame) -> Identity | None:
    """Who sent the message `frame` belongs to: its connection's CURVE key (ZAP user id)."""
    try:
        return Identity.parse(frame.get("User-Id"))
    except (zmq.ZMQError, AttributeError):  # a frame without metadata: not authenticated
        return None


def forbidden(msg, who: Identity | None, why: str) -> ProtocolError:
    """The refusal of `msg` from `who`: a FORBIDDEN error naming the key and the reason."""
    key = who.user_id if who is not None else "an unknown key"
    return ProtocolError(ErrorCode.FORBIDDEN, f"'{msg.OP}' from {key} refused: it {why}", rid=msg.rid)


class RouterDaemon:
    """Mixin: the request side and the loop of a ROUTER daemon (it supplies `tick`, `close`, `now`)."""

    ROLE = "daemon"                       # named in UNKNOWN_OP errors: "not served by a <ROLE>"
    sock: zmq.Socket
    metrics: MetricsRegistry
    ops: dict[str, Callable]
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    log = logging.getLogger("pscluster")
    # With CURVE (`keys`), every message carries who sent it: the role and
    # name of the key that authenticated the connection. `ALLOWED` maps an
    # op to the roles that may send it (an op not listed: any role).
    keys: ServerKeys | None = None
    ALLOWED: dict[str, frozenset] = {}
    identity: Identity | None = None     # the sender of the message being handled (None: no CURVE)

    stopping: bool = False

    def _serve_loop(self, others: Callable[[], dict]) -> None:
        """Poll the ROUTER and the daemon's other sockets until `stopping`, then `close()`.

        Each round: drain the ROUTER, call `others()[sock]()` for each other
        readable socket (the daemon's requests to peers, answered here), then
        `tick(now)`. `others()` is asked every round, since outgoing sockets
        come and go; the poller is rebuilt only when they changed. Nothing
        raised in a callback or a tick ends the loop: it is logged.
        """
        poller, polled = None, None
        try:
            while not self.stopping:
                extra = others()
                if poller is None or polled != set(extra):
                    poller, polled = zmq.Poller(), set(extra)
                    poller.register(self.sock, _POLLIN)
                    for sock in extra:
                        poller.register(sock, _POLLIN)
                for sock, _ in poller.poll(int(TICK_INTERVAL_S * 1000)):
                    if sock is self.sock:
                        self._drain()
                    else:
                        self._guarded(extra[sock])
                self._guarded(self.tick, self.now())
        finally:
            self.close()

    def _guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # the loop must outlive any bug
            self.log.exception("internal error in the daemon's loop")
            self.metrics.inc("internal_errors_total")

    def _drain(self) -> None:
        """Handle what is waiting on the ROUTER, at most MAX_BATCH_MSGS messages.

        Called when poll saw the socket readable; after each message, the
        socket's EVENTS say whether another waits (cheaper than a receive
        that raises zmq.Again).
        """
        sock = self.sock
        for _ in range(MAX_BATCH_MSGS):
            try:
                frames = recv_message(sock)
            except zmq.Again:
                return
            envelope, body = split_envelope(frames)
            self.handle(envelope, body)
            if not sock.getsockopt(_EVENTS) & _POLLIN:
                return

    def handle(self, envelope: list, frames: list) -> None:
        """Decode, validate and answer one message; never raises."""
        self.metrics.inc("bytes_received_total", sizes(frames))
        msg = None
        try:
            msg = decode(frames, max_message_bytes=self.max_message_bytes)
            handler = self.ops.get(msg.OP)
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_OP, f"op '{msg.OP}' is not served by a {self.ROLE} "
                                    f"(it serves: {', '.join(sorted(self.ops))})", rid=msg.rid)
            if self.keys is not None:
                self.identity = sender(frames[0])
                allowed = self.ALLOWED.get(msg.OP)
                if self.identity is None or (allowed is not None and self.identity.role not in allowed):
                    raise forbidden(msg, self.identity, f"is for {' or '.join(sorted(allowed or ()))} keys")
            handler(envelope, msg)
        except ProtocolError as exc:
            self._reject(envelope, exc)
        except Exception as exc:  # a bug must not take the daemon down with it
            self.log.exception("internal error")
            rid = msg.rid if msg is not None else 0  # so the client matches the answer to its request
            self._reject(envelope, ProtocolError(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}",
                                                 rid=rid))

    def _reject(self, envelope: list, exc: ProtocolError, job: str = "") -> None:
        """Answer with an `error` reply and count it by code."""
        self.metrics.inc("rejected_total", code=exc.code.value)
        self.log.info("rejected", extra={"code": exc.code.value, "why": exc.message})
        self._send(envelope, error_frames(exc.rid, exc.code, exc.message, job=job))

    def _send(self, envelope: list, frames: list, *, track: bool = False) -> list | None:
        """Send a reply (never blocks); per-frame trackers, or None if the peer is gone."""
        trackers = send_reply(self.sock, envelope, frames, track=track)
        if trackers is not None:
            self.metrics.inc("bytes_sent_total", sizes(frames))
        return trackers
