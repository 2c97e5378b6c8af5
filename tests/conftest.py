"""Fixtures shared by the suite: ZeroMQ contexts, sockets with timeouts, processes.

Following pyzmq's own test fixtures: loopback only, `linger=0` on every
socket, a timeout on every receive, every process reaped.
"""
from __future__ import annotations

import pytest
import zmq

from tests.procs import ProcGroup

RECV_TIMEOUT_MS = 10_000


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def procs():
    group = ProcGroup()
    yield group
    group.reap()


@pytest.fixture
def router(ctx):
    """A ROUTER bound to a random 127.0.0.1 port: (socket, its address)."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close(0)


@pytest.fixture
def dealer(ctx):
    """Factory: a DEALER connected to `addr`, with send/receive timeouts."""
    socks = []

    def make(addr: str) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
        sock.setsockopt(zmq.SNDTIMEO, RECV_TIMEOUT_MS)
        sock.connect(addr)
        socks.append(sock)
        return sock

    yield make
    for sock in socks:
        sock.close(0)


@pytest.fixture
def shard_factory():
    """Factory: a real Shard serving on a random loopback port in a thread of this process.

    Each shard has a zmq Context of its own, destroyed at teardown once its
    thread has stopped (the shard closes its sockets as its loop ends).
    """
    import threading

    from ps.shard import Shard

    started: list[tuple[object | None, threading.Thread, zmq.Context]] = []

    def make(shard_id: int = 0, **kwargs):
        box: dict = {}
        ready = threading.Event()
        context = zmq.Context()

        def run():
            try:
                box["shard"] = Shard(shard_id, "tcp://127.0.0.1:0", ctx=context, **kwargs)
            finally:
                ready.set()
            box["shard"].serve()

        thread = threading.Thread(target=run, name=f"shard-{shard_id}", daemon=True)
        started.append((None, thread, context))
        thread.start()
        assert ready.wait(10), "shard thread did not start"
        assert "shard" in box, "shard failed to start"
        started[-1] = (box["shard"], thread, context)
        return box["shard"]

    yield make
    for shard, _thread, _context in started:
        if shard is not None:
            shard.stop()
    stuck = []
    for _shard, thread, context in started:
        thread.join(10)
        if thread.is_alive():  # its sockets are still in use: destroying the context under it is unsafe
            stuck.append(thread.name)
        else:
            context.destroy(linger=0)
    assert not stuck, f"shard threads did not stop within 10 s: {stuck}"
