"""A driver for the scheduler's state machine in unit tests: one event at a time, a fake clock,
and helpers to pick replies, memberships and writes out of the instructions it returns."""
from __future__ import annotations

import dataclasses
import itertools

from protocol.assignment import Assignment
from protocol.messages import (
    Assign,
    Error,
    Heartbeat,
    Membership,
    Ok,
    Register,
    Report,
    Status,
    Submit,
)
from ps.sched.events import CallShard, Note, Persist, Reply, Request, ShardAnswer, Tick
from ps.sched.state import SchedulerState

TIMEOUT = 3.0                                   # heartbeat_timeout_s of every machine here
SHARDS = ("tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001")   # strings only: nothing is sent
TENSORS = [["w", [4, 2], "float32"], ["b", [2], "float32"]]
TRAIN_SIZE = 25                                 # 3 partitions: 9, 8 and 8 examples


def spec(**over) -> dict:
    base = {"name": "mnist", "workers": 2, "steps": 5,
            "model": {"kind": "mlp", "hidden": [4]}, "data": {"source": "sklearn:digits", "batch_size": 8}}
    base.update(over)
    return base


def parts(**progress) -> dict:
    """parts(p0=(0, 3)) -> the `state.parts` of partition 0 started at step 0, now at step 3."""
    return {k[1:]: {"from": first, "step": step} for k, (first, step) in progress.items()}


# --- picking instructions out of a list ---------------------------------------------------------


def replies(out: list, peer) -> list:
    return [i.msg for i in out if isinstance(i, Reply) and i.peer == peer]


def reply_to(out: list, peer):
    found = replies(out, peer)
    assert len(found) == 1, f"expected one reply to {peer!r}, found {found} in {out}"
    return found[0]


def memberships(out: list) -> list[CallShard]:
    return [i for i in out if isinstance(i, CallShard) and isinstance(i.msg, Membership)]


def persists(out: list, job: str) -> list[Persist]:
    return [i for i in out if isinstance(i, Persist) and i.job == job]


def assert_error(msg, code: str, *words: str) -> None:
    assert isinstance(msg, Error), msg
    assert msg.code == code, msg
    for word in words:
        assert word in msg.message, msg


class Driver:
    """The machine, a fake clock, and the shard calls it asked for that are not answered yet."""

    def __init__(self, *, shards=SHARDS, records=(), state_cls=SchedulerState, **options):
        options.setdefault("heartbeat_timeout_s", TIMEOUT)
        self.m = state_cls(list(records), **options)
        self.now = 0.0
        self.rids = itertools.count(1)
        self.pending: list[CallShard] = []
        self.log: list = []                     # every instruction, in order
        self.notes: list[Note] = []             # the job events noted (kept apart: tests of the other
                                                # instructions compare exact lists)
        self.shard_ids = list(range(len(shards)))
        for k, addr in enumerate(shards):
            ok = self.ask(f"server{k}", Register(role="server", addr=addr, shard=k))
            assert ok.body["shard"] == k

    def handle(self, event) -> list:
        out = self.m.handle(event)
        assert isinstance(out, list)
        self.notes += [i for i in out if isinstance(i, Note)]
        out = [i for i in out if not isinstance(i, Note)]
        self.pending += [i for i in out if isinstance(i, CallShard)]
        self.log += out
        return out

    def events(self, job: str) -> list[str]:
        """The kinds of job `job`'s events so far, in order."""
        return [n.kind for n in self.notes if n.job == job]

    def send(self, peer, msg) -> list:
        if not msg.rid:
            msg = dataclasses.replace(msg, rid=next(self.rids))
        return self.handle(Request(peer, msg, self.now))

    def ask(self, peer, msg):
        """Send `msg`; the one reply `peer` got."""
        return reply_to(self.send(peer, msg), peer)

    def ack(self, count: int | None = None) -> list:
        """Every shard answers Ok to the oldest `count` pending calls (all of them by default)."""
        out = []
        while self.pending and (count is None or count > 0):
            call = self.pending.pop(0)
            out += self.handle(ShardAnswer(call.call, Ok(rid=call.call), self.now))
            count = None if count is None else count - 1
        return out

    def tick(self, dt: float, alive=()) -> list:
        """Time passes; the shards and the `alive` workers heartbeat; the machine ticks."""
        self.now += dt
        for k in self.shard_ids:
            peer = self.m.servers.get(k)
            self.send(f"server{k}", Heartbeat(role="server", state={"shard": k, "addr": peer.addr if peer else ""}))
        for w in alive:
            self.send(f"{w}/hb", Heartbeat(role="worker", worker=w))
        return self.handle(Tick(self.now))

    # --- a worker's and a user's requests ---

    def register(self, w: str, **info):
        return self.ask(f"{w}/reg", Register(role="worker", worker=w, info=info))

    def assign(self, w: str, job: str = "", wait_s: float = 5.0, rid: int = 0, peer=None) -> list:
        return self.send(peer or f"{w}/assign", Assign(worker=w, job=job, wait_s=wait_s, rid=rid))

    def report(self, w: str, job: str, event: str, **state):
        """The reply `w` gets to its report; a plan is answered once the shards created the tables,
        so for a plan the shards answer first (every pending call)."""
        out = self.send(f"{w}/report", Report(worker=w, job=job, event=event, state=state))
        if event == "plan" and not replies(out, f"{w}/report"):
            out = self.ack()
        return reply_to(out, f"{w}/report")

    def heartbeat(self, w: str, job: str, **state):
        return self.ask(f"{w}/hb", Heartbeat(role="worker", worker=w, job=job, state=state))

    def status(self, job: str = "") -> dict:
        msg = self.ask("user", Status(job=job))
        assert isinstance(msg, Ok), msg
        return msg.body

    def submit(self, job_spec: dict, sid: str = "") -> str:
        msg = self.ask("user", Submit(spec=job_spec, submission_id=sid))
        assert isinstance(msg, Ok), msg
        return msg.body["job"]


def assignment(out: list, w: str) -> Assignment:
    msg = reply_to(out, f"{w}/assign")
    assert isinstance(msg, Ok), msg
    return Assignment.from_wire(msg.body)


def start(d: Driver, job_spec: dict, w: str = "w1") -> str:
    """Submit; `w` takes the job, holds every partition, sends the plan and creates the tables."""
    job = d.submit(job_spec)
    d.register(w)
    d.assign(w)
    a = assignment(d.ack(), w)
    assert a.init and a.partitions == list(range(job_spec["workers"]))
    assert "plan" in d.report(w, job, "plan", tensors=TENSORS, nonlearned=[], train_size=TRAIN_SIZE).body
    d.report(w, job, "initialized")
    return job


def two_holders(d: Driver, job_spec: dict) -> str:
    """A two-partition job: w1 initialised it and holds partition 0, w2 joined and holds partition 1."""
    assert job_spec["workers"] == 2
    job = d.submit(job_spec)
    for w in ("w1", "w2"):
        d.register(w)
        d.assign(w)
    assert assignment(d.ack(), "w1").partitions == [0, 1]
    d.report("w1", job, "plan", tensors=TENSORS, nonlearned=[], train_size=TRAIN_SIZE)
    assert d.report("w1", job, "initialized").body["release"] == [1]
    d.report("w1", job, "release", release=[1])
    assert assignment(d.ack(), "w2").partitions == [1]
    run = d.m.runs[job]
    assert [p.holder for p in run.partitions] == ["w1", "w2"]
    return job
