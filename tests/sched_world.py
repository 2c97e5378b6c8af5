"""A simulated cluster around the scheduler's state machine, for property tests.

No sockets and no processes: the machine (ps/sched/state.py) gets the events
a real cluster would send it, and its instructions are carried out by
simulated shards and workers that follow the real ones' protocol:

- a shard applies each membership (epoch, members, holders) when the world
  delivers the machine's call, and accepts one step of a partition only
  from the worker its membership names as the holder, at the partition's
  next step (a repeat of a step it has is a no-op): its `ledger` counts,
  per job and partition, the steps it accepted, the truth the machine's
  accounting is checked against;
- a worker registers, asks for work, initialises a job (plan, tables),
  trains the partitions it was told it holds at the lowest step first,
  reports progress in heartbeats, gives partitions back when asked, takes
  on partitions it was given, reports done, evaluates, and leaves when told.

Faults are actions too: a worker dies (never heard of again), freezes and
thaws (it comes back believing what it believed), reports twice or about
partitions it no longer holds, fails, diverges; shard calls are lost; time
jumps; peers send malformed requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from protocol.assignment import EVAL, Assignment
from protocol.errors import ErrorCode
from protocol.jobstate import FINAL_STATES, JobState
from protocol.messages import Assign, Cancel, Error, Heartbeat, Membership, Ok, Register, Report, Status, Submit
from protocol.partitions import partition_key
from ps.sched.events import CallShard, Note, Persist, Reply, Request, ShardAnswer, Stop, Tick
from ps.sched.jobs import SUCCEEDED
from ps.sched.state import SchedulerState

HEARTBEAT_TIMEOUT_S = 3.0
SHARD_ADDRS = ("tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001")
TRAIN_SIZE = 25  # 3 partitions of 9, 8 and 8 examples: epochs owe them 2E, E and E steps


def job_spec(name: str, partitions: int, steps: int | None, policy: str, epochs: float | None = None) -> dict:
    return {"name": name, "workers": partitions, "steps": steps, "epochs": epochs,
            "model": {"kind": "mlp", "hidden": [4]}, "data": {"source": "sklearn:digits", "batch_size": 8},
            "consistency": {"policy": policy}}


@dataclass
class SimShard:
    """One shard's view of each job: membership and clock table."""

    epoch: dict = field(default_factory=dict)      # job -> epoch applied
    members: dict = field(default_factory=dict)    # job -> {key: holder or ""}
    clocks: dict = field(default_factory=dict)     # job -> {key: steps done}

    def membership(self, msg: Membership) -> None:
        if msg.epoch <= self.epoch.get(msg.job, 0):
            return
        self.epoch[msg.job] = msg.epoch
        self.members[msg.job] = {k: msg.holders.get(k, "") for k in msg.workers}
        clocks = self.clocks.setdefault(msg.job, {})
        for key in msg.workers:
            clocks.setdefault(key, 0)

    def accepts(self, job: str, worker: str, parts: list[int], step: int) -> str:
        """"ok", "repeat" or why the push is refused."""
        members = self.members.get(job, {})
        for p in parts:
            if members.get(partition_key(p)) != worker:
                return "not_member"
        clocks = self.clocks[job]
        if all(clocks[partition_key(p)] > step for p in parts):
            return "repeat"
        if any(clocks[partition_key(p)] != step for p in parts):
            return "bad_clock"
        return "ok"


@dataclass
class SimWorker:
    id: str
    registered: bool = False
    dead: bool = False
    frozen: bool = False
    waiting: bool = False                 # an `assign` is out
    task: Assignment | None = None
    held: set = field(default_factory=set)
    start: dict = field(default_factory=dict)   # partition -> step it took it over at
    epoch: int = 0
    view: dict = field(default_factory=dict)     # the newest heartbeat answer about its job
    last_report: Report | None = None
    peer_count: int = 0


class World:
    """The machine, two shards, workers, and a clock; `act(action)` runs one step of the world."""

    def __init__(self, state_cls=SchedulerState, *, max_failures: int = 3):
        self.m = state_cls([], heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, max_failures=max_failures,
                           max_model_bytes=10**9)
        self.now = 0.0
        self.shards = {addr: SimShard() for addr in SHARD_ADDRS}
        self.workers: dict[str, SimWorker] = {}
        self.calls: list[CallShard] = []
        self.ledger: dict[str, dict[int, int]] = {}   # job -> partition -> steps the shards accepted (shard 0)
        self.owed: dict[str, list[int]] = {}
        self.job_ids: list[str] = []
        self.rank: dict[str, int] = {}
        self.internal_errors: list[str] = []
        self.stopped = False
        self.replies: dict = {}                        # peer -> the newest reply it got
        self.notes: dict[str, list[str]] = {}          # job -> the kinds of its events, in order
        for k, addr in enumerate(SHARD_ADDRS):
            self.send(("server", k), Register(role="server", addr=addr, shard=k))

    # --- plumbing ---

    def handle(self, event) -> None:
        out = self.m.handle(event)  # must never raise: a raise fails the property
        for inst in out:
            if isinstance(inst, Reply):
                if isinstance(inst.msg, Error) and inst.msg.code == ErrorCode.INTERNAL.value:
                    self.internal_errors.append(inst.msg.message)
                self.route(inst.peer, inst.msg)
            elif isinstance(inst, CallShard):
                self.calls.append(inst)
            elif isinstance(inst, Stop):
                self.stopped = True
            elif isinstance(inst, Note):
                self.notes.setdefault(inst.job, []).append(inst.kind)
            else:
                assert isinstance(inst, Persist), inst

    def send(self, peer, msg) -> None:
        self.handle(Request(peer, msg, self.now))

    def route(self, peer, msg) -> None:
        if isinstance(peer, tuple) and peer[0] == "assign":
            w = self.workers.get(peer[1])
            if w is not None and not w.dead and w.peer_count == peer[2]:
                self._assigned(w, msg)
        elif isinstance(peer, tuple) and peer[0] == "hb":
            w = self.workers.get(peer[1])
            if w is not None and isinstance(msg, Ok) and w.task is not None and msg.job == w.task.job:
                if msg.body.get("reregister"):
                    w.registered = False
                if "partitions" in msg.body:
                    w.view = dict(msg.body)
                if msg.body.get("stop"):
                    w.view = {**w.view, "stop": True}
        self.last_reply = msg
        self.replies[peer] = msg

    def deliver(self, count: int, lose: bool = False) -> None:
        """Deliver (or lose) the oldest pending shard calls."""
        for _ in range(min(count, len(self.calls))):
            if not self.calls:
                break  # a nested delivery (a plan answered inside an answer) took them
            call = self.calls.pop(0)  # answers may queue new calls behind it
            if lose:
                self.handle(ShardAnswer(call.call, None, self.now))
                continue
            if isinstance(call.msg, Membership):
                self.shards[call.addr].membership(call.msg)
            self.handle(ShardAnswer(call.call, Ok(rid=call.call), self.now))

    # --- workers ---

    def worker(self, index: int) -> SimWorker:
        wid = f"w{index}"
        if wid not in self.workers:
            self.workers[wid] = SimWorker(wid)
        return self.workers[wid]

    def register(self, w: SimWorker) -> None:
        if w.dead or w.frozen:
            return
        self._drop_task(w)  # a worker registers between assignments only (worker/daemon.py)
        self.send(("reg", w.id), Register(role="worker", worker=w.id))
        w.registered = True

    def ask(self, w: SimWorker) -> None:
        """An `assign`: for work (free) or for its partitions (in a job)."""
        if w.dead or w.frozen or w.waiting:
            return
        if not w.registered:
            if w.task is not None:
                return  # it leaves its task first (told to at its next step)
            self.register(w)
        w.waiting = True
        w.peer_count += 1
        job = w.task.job if w.task is not None else ""
        self.send(("assign", w.id, w.peer_count), Assign(worker=w.id, job=job, wait_s=5.0))

    def _assigned(self, w: SimWorker, msg) -> None:
        w.waiting = False
        if isinstance(msg, Error):
            if msg.code == ErrorCode.BAD_STATE.value:
                w.registered = False
            return
        if not msg.body.get("task"):
            self._drop_task(w)
            return
        a = Assignment.from_wire(msg.body)
        if w.task is None or w.task.job != a.job:
            self._drop_task(w)
        w.task, w.epoch, w.view = a, a.epoch, {}
        for p in a.partitions:
            w.start.setdefault(p, self._clock(a.job, p))
        w.held = set(a.partitions)
        if a.init and a.task != EVAL:
            body = self.report(w, "plan", {"tensors": [["w", [4, 2], "float32"]], "nonlearned": [],
                                           "train_size": TRAIN_SIZE})
            if body is None or "plan" not in body:
                return
            self.owed[a.job] = body["steps"]
            body = self.report(w, "initialized", {})
            if body is not None:
                self._apply(w, body)

    def _drop_task(self, w: SimWorker) -> None:
        w.task, w.held, w.start, w.view = None, set(), {}, {}

    def report(self, w: SimWorker, event: str, state: dict, parts=None) -> dict | None:
        if w.task is None:
            return None
        state = {**state, "parts": self._parts(w, parts)}
        msg = Report(worker=w.id, job=w.task.job, event=event, state=state)
        w.last_report = msg
        peer = ("rep", w.id)
        self.replies.pop(peer, None)
        self.send(peer, msg)
        if event == "plan" and peer not in self.replies:
            self.deliver(len(self.calls))  # the plan is answered once the shards created the tables
        reply = self.replies.get(peer)
        return reply.body if isinstance(reply, Ok) else None

    def _parts(self, w: SimWorker, only=None) -> dict:
        if w.task is None:
            return {}
        return {str(p): {"from": w.start.get(p, 0), "step": self._clock(w.task.job, p)}
                for p in w.held if only is None or p in only}

    def _clock(self, job: str, p: int) -> int:
        return min(s.clocks.get(job, {}).get(partition_key(p), 0) for s in self.shards.values())

    def heartbeat(self, w: SimWorker) -> None:
        if w.dead or w.frozen or not w.registered:
            return
        job = w.task.job if w.task is not None else ""
        self.send(("hb", w.id), Heartbeat(role="worker", worker=w.id, job=job, state={"parts": self._parts(w)}))

    def _apply(self, w: SimWorker, view: dict) -> None:
        release = [p for p in view.get("release", []) if p in w.held]
        if release:
            body = self.report(w, "release", {"release": release}, parts=release)
            w.held -= set(release)
            if body is not None:
                w.epoch = max(w.epoch, body.get("latest", 0))
        if view.get("stop"):
            self.leave(w)
            return
        given = view.get("partitions")
        if isinstance(given, list) and set(given) - w.held and view.get("epoch", 0) >= w.epoch:
            self.ask(w)  # sync: which partitions it holds now

    def leave(self, w: SimWorker, event: str = "stopped", state: dict | None = None) -> None:
        if w.task is not None:
            self.report(w, event, state or {})
        self._drop_task(w)

    def step(self, w: SimWorker) -> None:
        """One step boundary and one step of the worker's lowest partitions."""
        if w.dead or w.frozen or w.task is None or w.waiting:
            return
        job = w.task.job
        if w.task.task == EVAL:
            self.report(w, "final", {"test_accuracy": 0.9, "test_loss": 0.3})
            self._drop_task(w)
            return
        owed = self.owed.get(job) or w.task.steps
        finished = [p for p in w.held if owed and self._clock(job, p) >= owed[p]]
        if finished:
            body = self.report(w, "done", {}, parts=finished)
            w.held -= set(finished)
            if not w.held:
                self._drop_task(w)
                return
            if body is not None:
                w.epoch = max(w.epoch, body.get("latest", 0))
                self._apply(w, body)
        if w.view and (w.view.get("epoch", 0) >= w.epoch or w.view.get("stop")):
            view, w.view = w.view, {}
            self._apply(w, view)
        if w.task is None or w.waiting or not w.held:
            return
        step = min(self._clock(job, p) for p in w.held)
        parts = sorted(p for p in w.held if self._clock(job, p) == step)
        verdicts = {addr: s.accepts(job, w.id, parts, step) for addr, s in self.shards.items()}
        if any(v == "not_member" for v in verdicts.values()):
            self.leave(w)          # refused NOT_MEMBER: it leaves the job
            return
        if any(v == "bad_clock" for v in verdicts.values()):
            self.leave(w, "failed", {"error": "bad clock"})
            return
        for addr, s in self.shards.items():
            if verdicts[addr] == "ok":
                for p in parts:
                    s.clocks[job][partition_key(p)] += 1
                    if addr == SHARD_ADDRS[0]:
                        led = self.ledger.setdefault(job, {})
                        led[p] = led.get(p, 0) + 1
        self.heartbeat(w)

    # --- users ---

    def submit(self, spec: dict) -> None:
        self.send(("user",), Submit(spec=spec))
        reply = self.last_reply
        if isinstance(reply, Ok) and reply.body["job"] not in self.job_ids:
            self.job_ids.append(reply.body["job"])

    def cancel(self, index: int) -> None:
        if self.job_ids:
            self.send(("user",), Cancel(job=self.job_ids[index % len(self.job_ids)]))

    def status(self, job: str) -> dict:
        self.send(("user",), Status(job=job))
        return self.last_reply.body

    def tick(self, dt: float) -> None:
        """Time passes; every peer that is not dead or frozen heartbeats; the machine ticks."""
        self.now += dt
        for w in self.workers.values():
            self.heartbeat(w)
        for k, addr in enumerate(SHARD_ADDRS):
            self.send(("server", k), Heartbeat(role="server", state={"shard": k, "addr": addr}))
        self.handle(Tick(self.now))

    # --- what must always hold ---

    def check(self) -> None:
        assert not self.internal_errors, self.internal_errors
        m = self.m
        for job in self.job_ids:
            record = m.jobs[job]
            rank = JobState(record.state).rank
            assert rank >= self.rank.get(job, 0), f"{job} moved back to {record.state}"
            self.rank[job] = rank
            kinds = self.notes.get(job, [])
            # Its history starts with the submission and says once how it ended, as its last word
            # (`psctl logs`): an ended run notes "ended"; a job cancelled while queued, "cancelled".
            assert kinds[:1] == ["submitted"], f"{job}'s history starts with {kinds[:1]}"
            if record.state in FINAL_STATES and job not in m.runs:
                assert kinds.count("ended") <= 1 and kinds[-1] in ("ended", "cancelled"), \
                    f"{job} is {record.state} but its history ends with {kinds[-3:]}"
            if record.state == SUCCEEDED and record.result.get("stopped_by") != "target":
                owed = [p["steps"] for p in record.result["partitions"]]
                done = self.ledger.get(job, {})
                assert all(done.get(k, 0) == owed[k] for k in range(len(owed))), \
                    f"{job} succeeded but its partitions did {done} of {owed} steps"
                assert [p["steps_done"] for p in record.result["partitions"]] == owed
        for run in m.runs.values():
            for p in run.partitions:
                if p.holder is not None:
                    assert p.holder in m.workers and m.workers[p.holder].job == run.job_id, \
                        f"{run.job_id} partition {p.index} held by {p.holder}, not a live worker of the job"
        live: dict[tuple[str, int], str] = {}
        for w in self.workers.values():
            if w.task is None or w.dead or w.id not in m.workers:
                continue  # what a worker declared dead believes is refused by the shards
            for p in w.held:
                key = (w.task.job, p)
                assert key not in live, f"{key[0]} partition {p} held by two live workers: {live[key]} and {w.id}"
                live[key] = w.id

    def finished(self) -> bool:
        return all(self.m.jobs[j].state in FINAL_STATES for j in self.job_ids) and not self.m.runs


def work_round(world: World, dt: float = 0.5) -> None:
    """Every worker that is not dead or frozen does its part once; shard calls arrive; time passes."""
    for w in list(world.workers.values()):
        if w.dead or w.frozen:
            continue
        if not w.registered:
            world.register(w)
        if w.task is None:
            world.ask(w)
        else:
            world.step(w)
    world.deliver(len(world.calls))
    world.tick(dt)


def settle(world: World, rounds: int) -> None:
    """Faults over: every worker thaws and does its part until every job ended (or `rounds` run out)."""
    for w in world.workers.values():
        w.frozen = False
    for _ in range(rounds):
        if world.finished():
            return
        work_round(world)
        world.check()
