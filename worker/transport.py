"""Socket set-up shared by the worker side: connect a DEALER, send, receive, drain.

Every socket a worker (or `psctl`) opens is a DEALER to one peer: the
parameter client's one per shard (worker/client.py), the scheduler client's
(worker/sched_client.py), the heartbeat thread's (worker/heartbeat.py). They
are made here, the same way, with linger 0 and high-water marks named below.
`ps/` has its own small twin (ps/transport.py): the two packages never
import each other, and protocol/ knows nothing of sockets.

On the data path (the parameter client) a message is sent and received
frame by frame with plain-int flags and without copies of large frames,
exactly as before these helpers existed: they add a function call, nothing else.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import zmq

from protocol.buffers import keep_freed_buffers
from protocol.keys import ClientKeys

# Messages (not bytes) queued on one DEALER, each way, before ZeroMQ pushes
# back. A request socket holds one request at a time (Lazy Pirate: a silent
# request is re-sent on a fresh socket), so the bound is never reached in
# service; it only caps what a peer that stopped reading can make us hold.
# 1000 is ZeroMQ's default, and the shards' and the scheduler's own.
SEND_HWM_MSGS = 1000
RECV_HWM_MSGS = 1000
# Messages queued on the heartbeat socket while the scheduler is away. A
# beat is stale the moment the next one is due, so a short queue: beyond it
# beats are dropped (sent with DONTWAIT), not piled up for a scheduler's return.
HEARTBEAT_SEND_HWM_MSGS = 10
# Messages handled per wake-up before the loop's periodic work (the next
# heartbeat) gets a turn: bounded so a flood of replies cannot starve it.
MAX_DRAIN_MSGS = 256
# Frames smaller than this are copied into ZeroMQ's buffer instead of lent
# zero-copy (pyzmq's own cut-off; a plain copy skips building a Frame object).
COPY_THRESHOLD_BYTES = zmq.COPY_THRESHOLD
# Plain ints: pyzmq's flag enums cost a microsecond per use on the data path.
_NOBLOCK = int(zmq.NOBLOCK)
_DONTWAIT = int(zmq.DONTWAIT)
_SNDMORE = int(zmq.SNDMORE)


def connect_dealer(ctx: zmq.Context, addr: str, *, send_hwm: int = SEND_HWM_MSGS,
                   recv_hwm: int = RECV_HWM_MSGS, keys: ClientKeys | None = None) -> zmq.Socket:
    """A DEALER connected to `addr`: linger 0, high-water marks in messages, CURVE with `keys`
    (this process's pair and the public key of the daemon at `addr`).

    Raises zmq.ZMQError (the socket closed) when ZeroMQ cannot use the address.
    """
    keep_freed_buffers()  # before the socket starts the context's I/O thread
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, send_hwm)
    sock.setsockopt(zmq.RCVHWM, recv_hwm)
    if keys is not None:
        sock.curve_secretkey = keys.secret.encode("ascii")
        sock.curve_publickey = keys.public.encode("ascii")
        sock.curve_serverkey = keys.server.encode("ascii")
    try:
        sock.connect(addr)
    except zmq.ZMQError:
        sock.close(0)
        raise
    return sock


def send_message(sock: zmq.Socket, frames: Sequence) -> None:
    """Send one multipart message: small frames copied, large ones lent without a copy.

    Blocks only if the socket's queue is full (SEND_HWM_MSGS), which a
    request socket never reaches.
    """
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        flags = 0 if i == last else _SNDMORE
        sock.send(frame, flags, copy=memoryview(frame).nbytes < COPY_THRESHOLD_BYTES)


def send_nowait(sock: zmq.Socket, frames: Sequence) -> bool:
    """Send one message without blocking; False if the queue is full (the peer is away)."""
    try:
        sock.send_multipart(frames, _DONTWAIT, copy=False)
    except zmq.Again:
        return False
    return True


def recv_message(sock: zmq.Socket) -> list[zmq.Frame]:
    """One whole multipart message as frames, without copies; raises zmq.Again if none waits.

    ZeroMQ delivers the parts of a message together, so once the first part
    is here the rest are; `Frame.more` says whether one follows, which saves
    pyzmq's recv_multipart a getsockopt per part.
    """
    frame = sock.recv(_NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(_NOBLOCK, copy=False)
        frames.append(frame)
    return frames


def drain(sock: zmq.Socket, handle: Callable[[list[zmq.Frame]], None], limit: int = MAX_DRAIN_MSGS) -> int:
    """Hand `handle` each whole message waiting on `sock`, at most `limit`; returns how many."""
    for count in range(limit):
        try:
            frames = recv_message(sock)
        except zmq.Again:
            return count
        handle(frames)
    return limit
