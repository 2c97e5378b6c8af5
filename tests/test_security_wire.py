"""With CURVE the bytes on the wire are encrypted: a relay between a client and a shard sees no plaintext.

A TCP relay on loopback forwards a real client's connection to a real shard
and keeps every byte it carries both ways. The client creates a table whose
job id and tensor name are markers, with initial values holding another, and
pulls them back; the
relay must see the markers without CURVE (the control: the relay does carry
the traffic) and never with it.
"""
from __future__ import annotations

import select
import socket
import threading
import time

import numpy as np
import pytest
import zmq

from protocol.messages import Create, Ok, Pull, SliceData
from protocol.plan import make_plan
from tests.security_util import CurveDir, ask, curve_dealer

JOB = "plaintext-marker-job"
TENSOR = "marker_tensor_name"
VALUES = np.frombuffer(b"SECRET-PARAMETER-BYTES!!" * 64, dtype=np.float32)  # 1,536 bytes, a marker inside
RELAY_LIMIT_S = 60.0


class Relay:
    """Forwards TCP connections from 127.0.0.1:<port> to `upstream`, keeping every byte it carried."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.carried = bytearray()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        peers: dict[socket.socket, socket.socket] = {}
        deadline = time.monotonic() + RELAY_LIMIT_S
        try:
            while not self.stopping.is_set() and time.monotonic() < deadline:
                readable, _, _ = select.select([self.listener, *peers], [], [], 0.1)
                for sock in readable:
                    if sock is self.listener:
                        down, _ = self.listener.accept()
                        up = socket.create_connection(self.upstream, timeout=RELAY_LIMIT_S)
                        peers[down], peers[up] = up, down
                        continue
                    data = sock.recv(65536) if sock in peers else b""
                    if not data:
                        other = peers.pop(sock, None)
                        peers.pop(other, None)
                        sock.close()
                        if other is not None:
                            other.close()
                        continue
                    self.carried += data
                    peers[sock].sendall(data)
        except OSError:
            pass
        finally:
            for sock in peers:
                sock.close()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        self.listener.close()
        assert not self.thread.is_alive()


def create_and_pull_through_relay(shard_addr: str, keys: CurveDir | None) -> bytes:
    """Create a table with the marker values (a scheduler's op) and pull them back (an admin's, as
    `psctl export` does) through a relay; what the relay carried."""
    host, port = shard_addr.removeprefix("tcp://").rsplit(":", 1)
    relay = Relay((host, int(port)))
    ctx = zmq.Context()
    try:
        via = f"tcp://127.0.0.1:{relay.port}"
        server = keys.public("server") if keys else None
        sock = curve_dealer(ctx, via, keys.pair("scheduler") if keys else None, server)
        reader = curve_dealer(ctx, via, keys.pair("admin") if keys else None, server)
        plan = make_plan({TENSOR: ((VALUES.size,), "float32")}, 1)
        slices = tuple(SliceData(sid=s.sid, data=VALUES[s.start:s.stop]) for s in plan.slices)
        reply = ask(sock, Create(rid=1, job=JOB, plan=plan.to_wire(), optimizer={"kind": "sgd", "lr": 0.1},
                                 slices=slices))
        assert isinstance(reply, Ok), reply
        reply = ask(reader, Pull(rid=2, job=JOB, clock=-1, sids=[s.sid for s in plan.slices]))
        assert isinstance(reply, Ok) and reply.slices[0].data.tobytes() == VALUES.tobytes(), reply
        sock.close(0)
        reader.close(0)
    finally:
        ctx.destroy(linger=0)
        relay.close()
    return bytes(relay.carried)


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_the_relay_sees_plaintext_only_without_curve(procs, tmp_path, curve):
    keys = CurveDir.generate(tmp_path / "keys", [("scheduler", None), ("server", None), ("admin", None)]) \
        if curve else None
    shard = procs.server(0, *(["--curve-dir", str(keys.dir)] if curve else []))
    assert shard.ready["curve"] is curve
    carried = create_and_pull_through_relay(shard.ready["addr"], keys)
    assert len(carried) > 2 * VALUES.nbytes  # it did carry the traffic, both ways
    seen = [marker for marker in (JOB.encode(), TENSOR.encode(), b"SECRET-PARAMETER-BYTES") if marker in carried]
    assert seen == ([] if curve else [JOB.encode(), TENSOR.encode(), b"SECRET-PARAMETER-BYTES"])
