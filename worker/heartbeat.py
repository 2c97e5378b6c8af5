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

It beats at the interval the scheduler gave at registration (the worker
daemon passes it on with `set_interval`), HEARTBEAT_INTERVAL_S until then.
"""
from __future__ import annotations

import math
import threading
import time

import zmq

from protocol.codec import decode_ok, encode
from protocol.keys import ClientKeys
from protocol.messages import Heartbeat
from worker.transport import HEARTBEAT_SEND_HWM_MSGS, connect_dealer, drain, send_nowait

# Beat this often until the scheduler's `register` answer gives the interval
# for workers (ps/sched/state.py, WORKER_HEARTBEAT_INTERVAL_S: the same value,
# so a worker beats as asked even before the answer is read).
HEARTBEAT_INTERVAL_S = 0.25
# An interval from the scheduler is held to these bounds (seconds): a wrong
# value must neither make the thread spin nor fall silent.
MIN_HEARTBEAT_INTERVAL_S = 0.01
MAX_HEARTBEAT_INTERVAL_S = 60.0
# Longest the thread waits in one poll, whatever the interval: how soon
# `close()` is noticed (it joins for CLOSE_TIMEOUT_S).
MAX_POLL_S = 0.25
CLOSE_TIMEOUT_S = 5.0


class HeartbeatThread(threading.Thread):
    """Beats every `interval_s` until `close()`; thread-safe setters for what it reports."""

    def __init__(self, addr: str, worker: str, *, ctx: zmq.Context | None = None,
                 interval_s: float = HEARTBEAT_INTERVAL_S, keys: ClientKeys | None = None):
        super().__init__(name="heartbeat", daemon=True)
        self.addr = addr
        self.keys = keys
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

    def set_interval(self, seconds) -> bool:
        """Beat every `seconds` (held to the bounds), from the next beat on; False if it is not a number.

        Thread-safe (one float, read once per beat); the worker daemon calls
        it with the `heartbeat_interval_s` of the scheduler's register answer.
        """
        if type(seconds) not in (int, float) or not math.isfinite(seconds) or seconds <= 0:
            return False
        self.interval_s = min(MAX_HEARTBEAT_INTERVAL_S, max(MIN_HEARTBEAT_INTERVAL_S, float(seconds)))
        return True

    def close(self) -> None:
        self._closing.set()
        self.join(timeout=CLOSE_TIMEOUT_S)

    def run(self) -> None:
        sock = connect_dealer(self.ctx, self.addr, send_hwm=HEARTBEAT_SEND_HWM_MSGS, keys=self.keys)
        rid = 0
        last_beat = None
        try:
            while not self._closing.is_set():
                now = time.monotonic()
                # Read each time round: a new interval counts from the last beat.
                next_beat = now if last_beat is None else last_beat + self.interval_s
                if now >= next_beat:
                    last_beat = now
                    next_beat = now + self.interval_s
                    with self._lock:
                        job, state = self._job, self._state
                    rid += 1
                    # Dropped if the queue is full (scheduler away): keep beating, it may come back.
                    send_nowait(sock, encode(Heartbeat(rid=rid, worker=self.worker, job=job, role="worker",
                                                       state=state)))
                # The poll paces the loop: it wakes for a reply, the next beat, or to look for close().
                wait_s = min(MAX_POLL_S, next_beat - time.monotonic())
                if sock.poll(max(1, int(wait_s * 1000))):
                    drain(sock, self._on_answer)
        finally:
            sock.close(0)

    def _on_answer(self, frames: list) -> None:
        reply = decode_ok(frames)
        if reply is None:
            return
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
