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
    """Factory: a real Shard serving on a random loopback port in a thread of this process."""
    import threading

    from ps.shard import Shard

    started = []

    def make(shard_id: int = 0, **kwargs):
        box: dict = {}
        ready = threading.Event()

        def run():
            try:
                box["shard"] = Shard(shard_id, "tcp://127.0.0.1:0", ctx=zmq.Context(), **kwargs)
            finally:
                ready.set()
            box["shard"].serve()

        thread = threading.Thread(target=run, name=f"shard-{shard_id}", daemon=True)
        thread.start()
        assert ready.wait(10), "shard thread did not start"
        assert "shard" in box, "shard failed to start"
        started.append((box["shard"], thread))
        return box["shard"]

    yield make
    for shard, thread in started:
        shard.stop()
        thread.join(10)
