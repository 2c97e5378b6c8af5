"""One heartbeat interval per role, sent by the scheduler at registration and obeyed.

The scheduler's state machine answers `register` with the interval of the
registering role (ps/sched/state.py). Then, over real sockets on 127.0.0.1,
a scheduler stand-in (a ROUTER in a thread, answering with that same state
machine) gives a worker and a shard an interval far from their defaults,
and the beats it counts follow it: median gaps well under the default when
it asks for faster beats, a single beat in a window when it asks for slower
ones. Every wait is a bounded wait for a condition (a Condition or a poll
with a timeout); a slow machine only makes beats later, so the assertions
hold either way.
"""
from __future__ import annotations

import statistics
import threading
import time
from types import SimpleNamespace

import pytest
import zmq

from protocol.codec import decode, encode
from protocol.messages import Heartbeat, Ok, Register
from ps import scheduler_link
from ps.sched import state as sched_state
from ps.sched.events import Reply, Request
from ps.sched.state import HEARTBEAT_INTERVAL_S, SERVER_HEARTBEAT_INTERVAL_S, WORKER_HEARTBEAT_INTERVAL_S
from ps.scheduler_link import SchedulerLink
from ps.shard import Shard
from tests.sched_driver import Driver
from worker import heartbeat as worker_heartbeat
from worker.daemon import WorkerDaemon

WAIT_S = 10.0          # upper bound of any wait for something that must happen
QUIET_WINDOW_S = 1.0   # how long a slow beat must stay away (defaults would beat 2..4 times in it)
FAST_BEATS = 8         # beats whose gaps are measured


# --- the state machine ------------------------------------------------------------------------


def test_register_answers_with_the_interval_of_the_registering_role():
    d = Driver(shards=())
    server = d.ask("s", Register(role="server", addr="tcp://h:7000", shard=-1))
    worker = d.ask("w", Register(role="worker", worker="w1"))
    assert server.body["heartbeat_interval_s"] == SERVER_HEARTBEAT_INTERVAL_S == HEARTBEAT_INTERVAL_S["server"]
    assert worker.body["heartbeat_interval_s"] == WORKER_HEARTBEAT_INTERVAL_S == HEARTBEAT_INTERVAL_S["worker"]


def test_register_answers_follow_the_constants(monkeypatch):
    monkeypatch.setitem(HEARTBEAT_INTERVAL_S, "server", 1.5)
    monkeypatch.setitem(HEARTBEAT_INTERVAL_S, "worker", 0.125)
    d = Driver(shards=())
    assert d.ask("s", Register(role="server", addr="tcp://h:7000", shard=3)).body["heartbeat_interval_s"] == 1.5
    assert d.ask("w", Register(role="worker", worker="w1")).body["heartbeat_interval_s"] == 0.125


def test_defaults_before_registration_are_the_schedulers_values():
    assert worker_heartbeat.HEARTBEAT_INTERVAL_S == WORKER_HEARTBEAT_INTERVAL_S
    assert scheduler_link.DEFAULT_HEARTBEAT_INTERVAL_S == SERVER_HEARTBEAT_INTERVAL_S


# --- a scheduler stand-in on a real socket ----------------------------------------------------


class FakeScheduler:
    """A ROUTER on 127.0.0.1 in a thread, answering with the real state machine; records beat times by role."""

    def __init__(self):
        self.machine = sched_state.SchedulerState([], heartbeat_timeout_s=60.0)
        self.beats: dict[str, list[float]] = {"server": [], "worker": []}
        self.registers: list[Register] = []
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.addr = ""
        self._thread = threading.Thread(target=self._run, name="fake-scheduler", daemon=True)

    def start(self) -> FakeScheduler:
        self._thread.start()
        assert self._ready.wait(WAIT_S), "fake scheduler did not bind"
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        self.addr = f"tcp://127.0.0.1:{port}"
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                frames = sock.recv_multipart()
                envelope, msg = frames[:1], decode(frames[1:])
                with self.cond:
                    if isinstance(msg, Heartbeat):
                        self.beats[msg.role].append(time.monotonic())
                    elif isinstance(msg, Register):
                        self.registers.append(msg)
                    self.cond.notify_all()
                for inst in self.machine.handle(Request(tuple(envelope), msg, time.monotonic())):
                    if isinstance(inst, Reply):
                        sock.send_multipart(list(inst.peer) + encode(inst.msg))
        finally:
            sock.close(0)
            ctx.term()

    def wait_beats(self, role: str, count: int, timeout_s: float) -> list[float]:
        """The beat times of `role` once there are `count` (or whatever came within `timeout_s`)."""
        with self.cond:
            self.cond.wait_for(lambda: len(self.beats[role]) >= count, timeout_s)
            return list(self.beats[role])


def median_gap(times: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(times, times[1:], strict=False))


@pytest.fixture
def worker_under(monkeypatch):
    """Factory: a worker daemon registered with a fake scheduler that gives workers `interval_s`."""
    started = []

    def make(interval_s: float):
        monkeypatch.setitem(HEARTBEAT_INTERVAL_S, "worker", interval_s)
        fake = FakeScheduler().start()
        ctx = zmq.Context()
        daemon = WorkerDaemon(fake.addr, SimpleNamespace(name="cpu"), worker_id="w1", ctx=ctx)
        started.append((fake, daemon, ctx))
        daemon.register()
        daemon.heartbeat.start()
        return fake, daemon

    yield make
    for fake, daemon, ctx in started:
        daemon.heartbeat.close()
        daemon.sched.close()
        ctx.term()
        fake.stop()


@pytest.fixture
def shard_under(monkeypatch):
    """Factory: a shard without --shard-id serving in a thread, its scheduler a fake that gives servers `interval_s`."""
    started = []

    def make(interval_s: float):
        monkeypatch.setitem(HEARTBEAT_INTERVAL_S, "server", interval_s)
        fake = FakeScheduler().start()
        ctx = zmq.Context()
        shard = Shard(None, "tcp://127.0.0.1:0", ctx=ctx, scheduler=fake.addr, claim_timeout_s=WAIT_S)
        thread = threading.Thread(target=shard.serve, name="shard", daemon=True)
        started.append((fake, shard, thread, ctx))
        thread.start()
        return fake, shard

    yield make
    for fake, shard, thread, ctx in started:
        shard.stop()
        thread.join(WAIT_S)
        ctx.term()
        fake.stop()


def test_a_worker_beats_faster_when_the_scheduler_says_so(worker_under):
    fake, daemon = worker_under(0.04)
    assert daemon.heartbeat.interval_s == 0.04
    beats = fake.wait_beats("worker", FAST_BEATS, WAIT_S)
    assert len(beats) >= FAST_BEATS
    assert median_gap(beats) < worker_heartbeat.HEARTBEAT_INTERVAL_S / 2


def test_a_worker_beats_slower_when_the_scheduler_says_so(worker_under):
    fake, daemon = worker_under(30.0)
    assert daemon.heartbeat.interval_s == 30.0
    first = fake.wait_beats("worker", 1, WAIT_S)
    assert len(first) == 1
    # At the default interval, more beats would come within this window.
    assert len(fake.wait_beats("worker", 2, QUIET_WINDOW_S)) == 1


def test_a_shard_gets_its_id_at_startup_and_beats_faster_when_told(shard_under):
    fake, shard = shard_under(0.05)
    beats = fake.wait_beats("server", FAST_BEATS, WAIT_S)
    assert len(beats) >= FAST_BEATS
    assert shard.shard_id == 0 and shard.link.interval_s == 0.05
    assert [r.shard for r in fake.registers] == [-1]  # one registration: the claim
    # The shard's loop wakes every 0.1 s at most, so gaps are ~0.1 s; the default would give 0.5 s.
    assert median_gap(beats) < scheduler_link.DEFAULT_HEARTBEAT_INTERVAL_S / 2


def test_a_shard_beats_slower_when_told(shard_under):
    fake, shard = shard_under(30.0)
    assert len(fake.wait_beats("server", 1, WAIT_S)) == 1
    assert len(fake.wait_beats("server", 2, QUIET_WINDOW_S)) == 1
    assert shard.link.interval_s == 30.0


# --- the shard's link on its own --------------------------------------------------------------



def receive(sock, timeout_ms: int = int(WAIT_S * 1000)):
    """(envelope, message) of the next message on `sock`, or None after `timeout_ms`."""
    if not sock.poll(timeout_ms):
        return None
    frames = sock.recv_multipart()
    return frames[:1], decode(frames[1:])


def answer(link: SchedulerLink, sock, envelope, body: dict, rid: int = 1) -> None:
    sock.send_multipart(envelope + encode(Ok(rid=rid, body=body)))
    assert link.sock.poll(int(WAIT_S * 1000))
    link.on_readable()


def test_the_link_registers_beats_when_due_adopts_intervals_and_reregisters(ctx, router):
    sock, addr = router
    link = SchedulerLink(ctx, addr, advertise="tcp://127.0.0.1:1", shard=3, jobs=lambda: {"j": {"version": 2}})
    try:
        link.register()
        envelope, reg = receive(sock)
        assert isinstance(reg, Register) and (reg.shard, reg.addr, reg.info["jobs"]) == (3, "tcp://127.0.0.1:1", ["j"])
        answer(link, sock, envelope, {"heartbeat_interval_s": 2.0, "shard": 3})
        assert link.interval_s == 2.0

        link.tick(100.0)
        _, beat = receive(sock)
        assert isinstance(beat, Heartbeat) and beat.state == {"shard": 3, "addr": "tcp://127.0.0.1:1",
                                                               "jobs": {"j": {"version": 2}}}
        assert link.next_beat == 102.0
        link.tick(101.9)
        assert receive(sock, 100) is None  # not due yet

        answer(link, sock, envelope, {"heartbeat_interval_s": "fast"})
        assert link.interval_s == 2.0      # not a number: ignored
        answer(link, sock, envelope, {"heartbeat_interval_s": 1e-9})
        assert link.interval_s == scheduler_link.MIN_HEARTBEAT_INTERVAL_S
        assert link.next_beat == 100.0 + scheduler_link.MIN_HEARTBEAT_INTERVAL_S  # counted from the last beat

        answer(link, sock, envelope, {"reregister": True})
        _, again = receive(sock)
        assert isinstance(again, Register) and again.shard == 3
    finally:
        link.close()


def test_the_claim_of_a_shard_id_is_bounded_and_not_made_at_construction(ctx, router):
    sock, addr = router  # a scheduler that never answers
    shard = Shard(None, "tcp://127.0.0.1:0", ctx=ctx, scheduler=addr, claim_timeout_s=0.3)
    assert shard.shard_id is None and shard.link.sock is None   # constructing says nothing to anyone
    assert receive(sock, 100) is None
    with pytest.raises(RuntimeError, match="did not assign a shard id within 0.3s"):
        shard.start()
    _, claim = receive(sock)
    assert isinstance(claim, Register) and claim.shard == -1


def test_a_shard_without_an_id_needs_a_scheduler(ctx):
    with pytest.raises(RuntimeError, match="needs --scheduler"):
        Shard(None, "tcp://127.0.0.1:0", ctx=ctx)
