"""The worker's heartbeat thread (Paranoid Pirate): liveness plus progress.

It has its own socket (ZeroMQ sockets are not shared between threads) and
keeps beating while the main thread is busy computing or waiting on a
barrier, so a slow step never looks like a dead worker. The scheduler's
answer can tell the worker to leave its current job (`stop_requested`) or
to register again after a scheduler restart (`reregister_needed`). It also
carries the current addresses of the job's shards, so a worker follows a
shard that was restarted elsewhere (`shard_addresses`), and the partitions
the worker holds and should give back (`view`), which the training loop
acts on at its next step boundary.
"""
from __future__ import annotations

import threading
import time

import zmq

from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import Heartbeat, Ok

HEARTBEAT_INTERVAL_S = 0.25


class HeartbeatThread(threading.Thread):
    """Beats every `interval_s` until `close()`; thread-safe setters for what it reports."""

    def __init__(self, addr: str, worker: str, *, ctx: zmq.Context | None = None,
                 interval_s: float = HEARTBEAT_INTERVAL_S):
        super().__init__(name="heartbeat", daemon=True)
        self.addr = addr
        self.worker = worker
        self.ctx = ctx or zmq.Context.instance()
        self.interval_s = interval_s
        self.stop_requested = threading.Event()
        self.reregister_needed = threading.Event()
        self._closing = threading.Event()
        self._job = ""
        self._state: dict = {}
        self._shards: tuple[str, list[str]] | None = None  # (job, addresses) from the newest reply
        self._view: tuple[str, dict] | None = None          # (job, body) of the newest reply about a job
        self._lock = threading.Lock()

    def report(self, job: str, state: dict) -> None:
        """What the next beats carry: the current job and its progress."""
        with self._lock:
            if job != self._job:
                self.stop_requested.clear()
                self._view = None
            self._job, self._state = job, dict(state)

    def shard_addresses(self, job: str) -> list[str] | None:
        """The addresses of `job`'s shards as the scheduler last told them, or None."""
        with self._lock:
            known = self._shards
        return list(known[1]) if known is not None and known[0] == job else None

    def view(self, job: str) -> dict | None:
        """The scheduler's newest word on this worker's part in `job` (partitions, release, epoch), or None."""
        with self._lock:
            known = self._view
        return dict(known[1]) if known is not None and known[0] == job else None

    def close(self) -> None:
        self._closing.set()
        self.join(timeout=5)

    def run(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10)
        sock.connect(self.addr)
        rid = 0
        next_beat = 0.0
        try:
            while not self._closing.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.interval_s
                    with self._lock:
                        job, state = self._job, self._state
                    rid += 1
                    try:
                        sock.send_multipart(encode(Heartbeat(rid=rid, worker=self.worker, job=job, role="worker",
                                                             state=state)), zmq.DONTWAIT)
                    except zmq.Again:
                        pass  # scheduler away: keep beating, it may come back
                # The poll paces the loop: it wakes for a reply or for the next beat.
                if sock.poll(max(1, int((next_beat - time.monotonic()) * 1000))):
                    self._drain(sock)
        finally:
            sock.close(0)

    def _drain(self, sock: zmq.Socket) -> None:
        for _ in range(100):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = decode(frames)
            except ProtocolError:
                continue
            if not isinstance(reply, Ok):
                continue
            if reply.body.get("reregister"):
                self.reregister_needed.set()
            shards = reply.body.get("shards")
            with self._lock:
                current = self._job
                if reply.job and isinstance(shards, list) and all(isinstance(a, str) for a in shards):
                    self._shards = (reply.job, shards)
                if reply.job and reply.job == current and _is_view(reply.body):
                    self._view = (reply.job, reply.body)
            if reply.body.get("stop") and reply.job and reply.job == current:
                self.stop_requested.set()


def _is_view(body: dict) -> bool:
    """A heartbeat answer that says which partitions the worker holds (and from which epoch)."""
    parts, release, epoch = body.get("partitions"), body.get("release", []), body.get("epoch")
    return (isinstance(parts, list) and isinstance(release, list) and type(epoch) is int
            and all(type(k) is int for k in parts) and all(type(k) is int for k in release))
