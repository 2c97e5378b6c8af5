"""Socket set-up shared by the daemons in `ps/`: bind, connect, send, receive safely.

The one module of `ps/` besides the daemon loops that knows about ZeroMQ
sockets (README.md, "Development"): ROUTER with ROUTER_MANDATORY, DEALER
to a peer, both with linger 0 and bounded high-water marks; one whole
message received at a time; a socket drained with a bound. `worker/` has
its own small twin (worker/transport.py): the two packages never import
each other, and protocol/ knows nothing of sockets.

It also tunes the C allocator once per process (`protocol.buffers.keep_freed_buffers`):
ZeroMQ allocates a fresh buffer for every message frame it receives, and
glibc by default hands a freed buffer of several MiB back to the kernel, so
the next message of that size page-faults every page in again; at 16 MiB
per push that cost a shard thousands of page faults per message and
doubled the push time (measured with `psctl bench pushpull`).
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from protocol.buffers import keep_freed_buffers
from protocol.keys import ClientKeys, KeyRing, ServerKeys

# Messages (not bytes) queued per peer, each way, before ZeroMQ pushes back:
# a send that would pass it raises zmq.Again (our sends never block) and the
# peer re-asks. Bounded so one slow or dead peer cannot make a daemon hold
# unbounded memory; in service a request socket holds a handful (one request
# per job and op at most), so 1000, ZeroMQ's default, is never reached.
SEND_HWM_MSGS = 1000
RECV_HWM_MSGS = 1000
# Messages queued on a socket that carries heartbeats (a shard's link to the
# scheduler) while the scheduler is away. A beat is stale the moment the next
# one is due, so a short queue; beyond it beats are dropped, not queued.
HEARTBEAT_SEND_HWM_MSGS = 10
# Messages handled per wake-up of a loop before its periodic work (heartbeats,
# re-sends, ticks) gets a turn: bounded so a flood cannot starve them.
MAX_DRAIN_MSGS = 256
# Frames smaller than this are copied into ZeroMQ's own buffer rather than
# lent zero-copy: pyzmq's own cut-off, below which lending costs more than it saves.
COPY_THRESHOLD_BYTES = zmq.COPY_THRESHOLD


class BindError(RuntimeError):
    """The daemon could not bind its address; the message is one sentence."""


class KeyRingAuthenticator(ThreadAuthenticator):
    """ZAP for one context: a CURVE client is let in when its public key is in the ring.

    The ZAP user id of a connection is "ROLE:NAME" of its key, so every
    frame a daemon receives says who sent it (`Frame.get("User-Id")`).
    """

    def __init__(self, ctx: zmq.Context, ring: KeyRing):
        super().__init__(ctx)
        self.ring = ring
        self.configure_curve_callback("*", self)

    def callback(self, domain: str, key: bytes) -> bool:
        return key.decode("ascii", "replace") in self.ring.by_key

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.ring.by_key[z85.encode(client_public_key).decode("ascii")].user_id


_AUTHENTICATORS: dict[int, KeyRingAuthenticator] = {}


def start_authenticator(ctx: zmq.Context, ring: KeyRing) -> None:
    """Start ZAP on `ctx` (once per context), before any CURVE server socket binds."""
    if id(ctx) not in _AUTHENTICATORS:
        auth = KeyRingAuthenticator(ctx, ring)
        auth.start()
        _AUTHENTICATORS[id(ctx)] = auth


def stop_authenticator(ctx: zmq.Context) -> None:
    auth = _AUTHENTICATORS.pop(id(ctx), None)
    if auth is not None:
        auth.stop()


def curve_client(sock: zmq.Socket, keys: ClientKeys | None) -> None:
    """Make `sock` (not yet connected) speak CURVE to the daemon whose public key `keys.server` is."""
    if keys is not None:
        sock.curve_secretkey = keys.secret.encode("ascii")
        sock.curve_publickey = keys.public.encode("ascii")
        sock.curve_serverkey = keys.server.encode("ascii")


def bind_router(ctx: zmq.Context, addr: str, keys: ServerKeys | None = None) -> tuple[zmq.Socket, str]:
    """A ROUTER bound to `addr` and the endpoint it really bound.

    With `keys`, the socket is a CURVE server: only keys of the ring get in
    (start_authenticator runs first), and all traffic is encrypted. A port
    of 0 or '*' picks a free port. Raises BindError naming the address when
    the port is taken or the address is not ours.
    """
    keep_freed_buffers()  # before the socket starts the context's I/O thread
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, SEND_HWM_MSGS)
    sock.setsockopt(zmq.RCVHWM, RECV_HWM_MSGS)
    if keys is not None:
        start_authenticator(ctx, keys.ring)
        sock.curve_server = True
        sock.curve_secretkey = keys.secret.encode("ascii")
        sock.curve_publickey = keys.public.encode("ascii")
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


def connect_dealer(ctx: zmq.Context, addr: str, *, send_hwm: int = SEND_HWM_MSGS,
                   recv_hwm: int = RECV_HWM_MSGS, keys: ClientKeys | None = None) -> zmq.Socket:
    """A DEALER connected to `addr`: linger 0, high-water marks in messages, CURVE with `keys`.

    Raises zmq.ZMQError (the socket closed) when ZeroMQ cannot use the address.
    """
    keep_freed_buffers()  # before the socket starts the context's I/O thread
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, send_hwm)
    sock.setsockopt(zmq.RCVHWM, recv_hwm)
    curve_client(sock, keys)
    try:
        sock.connect(addr)
    except zmq.ZMQError:
        sock.close(0)
        raise
    return sock


# Plain ints: pyzmq's flag enums cost a microsecond per use on the data path.
_NOBLOCK = int(zmq.NOBLOCK)
_DONTWAIT = int(zmq.DONTWAIT)
_SNDMORE = int(zmq.SNDMORE)
_FIRST_FLAGS = int(zmq.SNDMORE | zmq.DONTWAIT)


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


def send_nowait(sock: zmq.Socket, frames: Sequence) -> bool:
    """Send one message on a DEALER without blocking; False if its queue is full (the peer is away)."""
    try:
        sock.send_multipart(frames, _DONTWAIT, copy=False)
    except zmq.Again:
        return False
    return True


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
    frame's tracker tells when ZeroMQ no longer reads its memory. Frames
    under ZeroMQ's copy threshold are copied at once (pyzmq would copy them
    anyway) and have no tracker (None): their memory is free on return.
    """
    try:
        sock.send(envelope[0], _FIRST_FLAGS, copy=True)
    except zmq.ZMQError as exc:
        if exc.errno in (zmq.EHOSTUNREACH, zmq.EAGAIN):
            return None
        raise
    # After the first part ZeroMQ takes the whole message atomically.
    for part in envelope[1:]:
        sock.send(part, _SNDMORE, copy=True)
    trackers = []
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        flags = 0 if i == last else _SNDMORE
        if memoryview(frame).nbytes < COPY_THRESHOLD_BYTES:
            # A plain copying send skips building a zero-copy Frame object.
            sock.send(frame, flags, copy=True)
            trackers.append(None)
        else:
            trackers.append(sock.send(frame, flags, copy=False, track=track))
    return trackers


def create_key_pair(folder, name: str) -> tuple[str, str]:
    """Write NAME.key and NAME.key_secret (ZeroMQ's certificate format) in `folder`; their paths.

    The secret file is readable by its owner only.
    """
    public, secret = zmq.auth.create_certificates(folder, name)
    os.chmod(secret, 0o600)
    return str(public), str(secret)
