"""Socket set-up shared by the daemons in `ps/`: bind, send, receive safely.

The one module of `ps/` besides the daemon loops that knows about ZeroMQ
sockets (STYLE.md, habit 3): ROUTER with ROUTER_MANDATORY, linger 0,
bounded high-water marks.
"""
from __future__ import annotations

import errno
from typing import Sequence

import zmq

# Messages queued per peer before ZeroMQ pushes back. Bounded so one slow
# peer cannot make a daemon hold unbounded memory; 1000 is ZeroMQ's default.
SEND_HWM_MSGS = 1000
RECV_HWM_MSGS = 1000


class BindError(RuntimeError):
    """The daemon could not bind its address; the message is one sentence."""


def bind_router(ctx: zmq.Context, addr: str) -> tuple[zmq.Socket, str]:
    """A ROUTER bound to `addr` and the endpoint it really bound.

    A port of 0 or '*' picks a free port. Raises BindError naming the
    address when the port is taken or the address is not ours.
    """
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, SEND_HWM_MSGS)
    sock.setsockopt(zmq.RCVHWM, RECV_HWM_MSGS)
    bind_to = addr
    if addr.startswith("tcp://") and addr.rsplit(":", 1)[-1] == "0":
        bind_to = addr.rsplit(":", 1)[0] + ":*"
    try:
        sock.bind(bind_to)
    except zmq.ZMQError as exc:
        sock.close(0)
        port = addr.rsplit(":", 1)[-1]
        if exc.errno == errno.EADDRINUSE:
            raise BindError(f"cannot listen on {addr}: port {port} is already in use") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise BindError(f"cannot listen on {addr}: that address does not belong to this machine") from None
        raise BindError(f"cannot listen on {addr}: {exc.strerror}") from None
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return sock, endpoint


def split_envelope(frames: Sequence[zmq.Frame]) -> tuple[list, list]:
    """(routing envelope, message frames) of a message read from a ROUTER.

    A DEALER peer sends [identity, header, ...]; a REQ peer adds an empty
    delimiter: [identity, b"", header, ...]. Both are answered alike.
    """
    if len(frames) >= 2 and len(frames[1]) == 0:
        return list(frames[:2]), list(frames[2:])
    return list(frames[:1]), list(frames[1:])


def send_reply(sock: zmq.Socket, envelope: Sequence, frames: Sequence, *, track: bool = False) -> list | None:
    """Send `frames` behind `envelope`; returns per-frame trackers, or None if the peer is gone.

    Never blocks: a peer that vanished (EHOSTUNREACH) or whose queue is full
    (EAGAIN) loses this reply and will re-ask (clients retry with the same
    request id). Payload frames go without a copy; with `track`, each
    frame's tracker tells when ZeroMQ no longer reads its memory.
    """
    try:
        sock.send(envelope[0], zmq.SNDMORE | zmq.DONTWAIT, copy=True)
    except zmq.ZMQError as exc:
        if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
            return None
        raise
    # After the first part ZeroMQ takes the whole message atomically.
    for part in envelope[1:]:
        sock.send(part, zmq.SNDMORE, copy=True)
    trackers = []
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        flags = 0 if i == last else zmq.SNDMORE
        trackers.append(sock.send(frame, flags, copy=False, track=track))
    return trackers
