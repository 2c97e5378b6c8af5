"""The scheduler as a pure state machine: events in, instructions out.

`SchedulerState.handle(event)` takes a `Request` (a decoded message and
the peer to answer), a `ShardAnswer` or a `Tick`, and returns the
instructions the daemon performs in order (ps/sched/events.py). It has no
sockets, no sqlite and no clock: time comes in with each event, the job
store's rows come in at construction, and what must be written goes out
as `Persist`. So it is driven in tests event by event, with a fake clock,
and a property test checks its invariants after every event
(tests/test_sched_properties.py).

Nothing raises out of `handle`: a refused request is answered with an
`error` (a code and a sentence); an unexpected exception is logged with
its traceback and answered with `internal`, carrying the request id.

Liveness follows the ZeroMQ guide's Paranoid Pirate pattern: every peer
heartbeats; one silent for `heartbeat_timeout_s` is dead. A dead worker's
partitions go to live workers of the job at once (ps/sched/placement.py)
and the job's shards get a new membership epoch, so no barrier waits for
it and no partition skips a step. A worker is told the partitions it was
given only once every shard of the job acknowledged the epoch that gives
them, so its first push is never refused as coming from a stranger.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.assignment import EVAL, TRAIN, Assignment
from protocol.errors import ErrorCode, ProtocolError
from protocol.jobspec import SpecError, known_data, min_param_bytes, validate_job
from protocol.jobstate import FINAL_STATES
from protocol.keys import Identity
from protocol.messages import Checkpoint, Error, Membership, Ok
from protocol.metrics import MetricsRegistry
from protocol.plan import MAX_SHARDS
from ps.sched import checks
from ps.sched.auth import authorize
from ps.sched.checkpoints import Checkpoints
from ps.sched.events import CallShard, Note, Persist, Reply, Request, ShardAnswer, Tick
from ps.sched.jobs import CANCELLED, FAILED, QUEUED, SUCCEEDED, JobRecord, JobRun
from ps.sched.placement import Placement
from ps.sched.reports import Reports
from ps.sched.views import Views

log = logging.getLogger("pscluster.scheduler")

# Events one job may add to its history in one scheduler run (README.md, `psctl logs`).
MAX_NOTES_PER_JOB = 10_000

# How often each role heartbeats, in seconds: the `register` reply carries the
# registering role's value (`heartbeat_interval_s`) and the peer obeys it
# (ps/scheduler_link.py, worker/heartbeat.py). Workers beat faster: their beat's
# answer is how they learn, between steps, of stops, moves and partitions.
SERVER_HEARTBEAT_INTERVAL_S = 0.5
WORKER_HEARTBEAT_INTERVAL_S = 0.25
HEARTBEAT_INTERVAL_S = {"server": SERVER_HEARTBEAT_INTERVAL_S, "worker": WORKER_HEARTBEAT_INTERVAL_S}
# Silent this long means dead. 3..5 intervals is reasonable; we allow more
# because a busy 2-core machine can stall a process for a second or two.
HEARTBEAT_TIMEOUT_S = 6.0
# Longest a worker's `assign` is held when there is nothing to do.
ASSIGN_WAIT_MAX_S = 30.0
# How often running jobs' progress is written to the job store.
PROGRESS_SAVE_INTERVAL_S = 2.0
# How often a running job's progress is sampled for its loss curve.
CURVE_SAMPLE_INTERVAL_S = 0.2
# Failures in a row of one partition's holders that fail the job.
MAX_FAILURES = 3
# Epochs are incarnation * EPOCH_STRIDE + counter, so a restarted scheduler's
# epochs are newer than anything the shards saw from the previous one.
EPOCH_STRIDE = 1 << 24
# Longest submission id kept.
MAX_SUBMISSION_ID_CHARS = 128


@dataclass
class Held:
    """A request answered later: a worker's `assign` long poll."""

    peer: object
    rid: int
    deadline: float


@dataclass
class WorkerPeer:
    id: str
    last_seen: float
    info: dict = field(default_factory=dict)
    job: str | None = None          # the job it has a part in (holds, joins, initialises or evaluates)
    waiting: Held | None = None


@dataclass
class ServerPeer:
    shard: int
    addr: str
    last_seen: float
    info: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)   # job -> its table's summary, from heartbeats
    identity: Identity | None = None            # the CURVE key it registered with
    key: str = ""                               # that key's public half, for the calls to it
    checkpoints: dict = field(default_factory=dict)  # job -> complete checkpoint versions it holds


class SchedulerState(Placement, Reports, Views, Checkpoints):
    """Jobs, membership and assignments. `handle(event) -> instructions`; never raises."""

    def __init__(self, records: list[JobRecord], *, incarnation: int = 1,
                 heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S, max_model_bytes: int = 0,
                 max_failures: int = MAX_FAILURES, metrics: MetricsRegistry | None = None, wall_offset: float = 0.0,
                 public_key: Callable[[Identity], str | None] | None = None):
        self.jobs: dict[str, JobRecord] = {r.id: r for r in sorted(records, key=lambda r: r.seq)}
        self.submissions = {r.submission_id: r.id for r in records if r.submission_id}
        self.next_seq = max((r.seq for r in records), default=0) + 1
        self.runs: dict[str, JobRun] = {}
        self.servers: dict[int, ServerPeer] = {}
        # shard -> (address, instance) an admin evicted: that process may not take the id back
        # (a server restarted at the same address is another instance and may).
        self.evicted: dict[int, tuple[str, str]] = {}
        self.workers: dict[str, WorkerPeer] = {}
        self.calls: dict[int, tuple] = {}          # call id -> (kind, job, shard index, epoch)
        self._call_ids = itertools.count(1)
        self.sent: dict[tuple[str, int], int] = {}  # (job, shard index) -> newest epoch sent
        self.epoch_base = incarnation * EPOCH_STRIDE
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.max_model_bytes = max_model_bytes
        self.max_failures = max_failures
        self.metrics = metrics or MetricsRegistry()
        self.wall_offset = wall_offset              # wall clock = now + wall_offset (for records)
        self.public_key = public_key or (lambda identity: None)   # CURVE: a key's public half
        self._saved_at = self._sampled_at = float("-inf")
        self.shards_changed_at = float("-inf")      # when a server last registered (ps/sched/placement.py)
        self.identity: Identity | None = None
        self._now = 0.0                             # the current event's time, for notes
        self._notes: list[Note] = []                # job events noted while handling it
        self._noted: dict[str, int] = {}            # job -> events noted (bounded per job)
        self.ops = {
            "register": self.on_register, "heartbeat": self.on_heartbeat, "assign": self.on_assign,
            "report": self.on_report, "submit": self.on_submit, "status": self.on_status,
            "cancel": self.on_cancel, "list": self.on_list, "export": self.on_export,
            "stats": self.on_stats, "shutdown": self.on_shutdown, "evict": self.on_evict,
            "logs": self.on_logs, "resume": self.on_resume,
        }

    # --- the one entry point ---

    def handle(self, event) -> list:
        """The instructions for `event`, in the order they must be performed."""
        out: list = []
        self.identity = None
        self._now = event.now if isinstance(event, (Request, ShardAnswer, Tick)) else self._now
        try:
            if isinstance(event, Request):
                self._request(event, out)
            elif isinstance(event, ShardAnswer):
                self._shard_answer(event, out)
            elif isinstance(event, Tick):
                self._tick(event.now, out)
            else:
                raise TypeError(f"not a scheduler event: {type(event).__name__}")
            self._settle(event.now, out)
        except Exception as exc:  # a bug must not take the scheduler down with it
            log.exception("internal error", extra={"event": type(event).__name__})
            self.metrics.inc("internal_errors_total")
            if isinstance(event, Request) and not any(isinstance(i, Reply) and i.peer is event.peer for i in out):
                self._error(out, event.peer, event.msg.rid, ErrorCode.INTERNAL,
                            f"internal error: {type(exc).__name__}: {exc}"[:300], event.msg.job)
        out.extend(self._notes)
        self._notes.clear()
        return out

    def _note(self, job: str, kind: str, text: str, *, level: int = logging.INFO, **facts) -> None:
        """Log an event of job `job` and add it to the job's history (`psctl logs`), at most
        MAX_NOTES_PER_JOB per job and scheduler run (a flapping worker cannot fill the disk)."""
        log.log(level, text, extra={"job": job, "event": kind, **facts})
        count = self._noted.get(job, 0) + 1
        self._noted[job] = count
        if count < MAX_NOTES_PER_JOB:
            self._notes.append(Note(job, self._wall(self._now), kind, text, facts))
        elif count == MAX_NOTES_PER_JOB:
            self._notes.append(Note(job, self._wall(self._now), "truncated",
                                    f"over {MAX_NOTES_PER_JOB:,} events: the rest are only in the scheduler's log"))

    def _request(self, req: Request, out: list) -> None:
        msg = req.msg
        handler = self.ops.get(msg.OP)
        try:
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_OP, f"op '{msg.OP}' is not served by the scheduler "
                                    f"(it serves: {', '.join(sorted(self.ops))})", rid=msg.rid)
            authorize(req.identity, msg)
            self.identity = req.identity   # who sent the request being handled (None: CURVE off)
            handler(req, out)
        except ProtocolError as exc:
            self._error(out, req.peer, msg.rid, exc.code, exc.message, msg.job)

    def _settle(self, now: float, out: list) -> None:
        """After any event: placement, job ends, memberships out, held answers released."""
        self._place(now, out)
        self._finish_runs(now, out)
        self._flush_memberships(out)
        self._answer_ready(out)

    # --- replies ---

    def _ok(self, out: list, req: Request, body: dict, job: str = "") -> None:
        out.append(Reply(req.peer, Ok(rid=req.msg.rid, job=job or req.msg.job, body=body)))

    def _error(self, out: list, peer, rid: int, code: ErrorCode, message: str, job: str = "") -> None:
        self.metrics.inc("rejected_total", code=code.value)
        log.info("rejected", extra={"code": code.value, "why": message})
        out.append(Reply(peer, Error(rid=rid, job=job, code=code.value, message=message)))

    def _persist(self, out: list, record: JobRecord, **fields) -> None:
        for key, value in fields.items():
            setattr(record, key, value)
        out.append(Persist(record.id, fields))

    def _wall(self, now: float) -> float:
        return now + self.wall_offset

    # --- peers ---

    def on_register(self, req: Request, out: list) -> None:
        msg, now = req.msg, req.now
        if msg.role == "server":
            addr = checks.server_address(msg.addr, msg.rid)
            if not -1 <= msg.shard < MAX_SHARDS:
                raise checks.bad(f"shard must be -1 (any) or an id in 0..{MAX_SHARDS - 1}", msg.rid)
            shard = msg.shard if msg.shard >= 0 else next(k for k in range(len(self.servers) + 1)
                                                           if k not in self.servers)
            old = self.servers.get(shard)
            info = checks.info(msg.info)
            if self.evicted.get(shard) == (addr, info.get("instance", "")):
                raise ProtocolError(ErrorCode.BAD_STATE, f"shard {shard} at {addr} was evicted by an admin: "
                                    "restart that server to bring it back", rid=msg.rid)
            if old is not None and old.addr != addr:
                # A live shard keeps its id: a second server may take it once the first is declared
                # dead (silent for the heartbeat timeout) or an admin evicted it (psctl evict-shard).
                raise ProtocolError(ErrorCode.BAD_STATE, f"shard {shard} is registered at {old.addr} and alive: "
                                    "start this server once that one is declared dead, or evict it "
                                    f"(psctl evict-shard {shard})", rid=msg.rid)
            key = self.public_key(req.identity) if req.identity is not None else None
            self.servers[shard] = ServerPeer(shard, addr, now, info, identity=req.identity, key=key or "")
            self.shards_changed_at = now
            log.info("server registered", extra={"shard": shard, "addr": addr})
            self._shard_came_back(shard, addr, out)
            self._shard_restarted(shard, info.get("instance", ""), checks.restored_jobs(msg.info), out)
        elif msg.role == "worker":
            if not msg.worker:
                raise checks.bad("a worker registers with its worker id", msg.rid)
            peer = self.workers.get(msg.worker)
            if peer is None:
                peer = self.workers[msg.worker] = WorkerPeer(msg.worker, now, checks.info(msg.info))
                log.info("worker registered", extra={"worker": msg.worker, **peer.info})
            peer.last_seen = now
            shard = -1
        else:
            raise checks.bad(f"role must be server or worker, found {msg.role!r:.40}", msg.rid)
        self._ok(out, req, {"heartbeat_interval_s": HEARTBEAT_INTERVAL_S[msg.role],
                            "heartbeat_timeout_s": self.heartbeat_timeout_s,
                            "shard": shard if msg.role == "server" else -1})

    def _shard_came_back(self, shard: int, addr: str, out: list) -> None:
        """A (re)registered shard: running jobs follow it to `addr` and tell it their membership.

        A shard restarted from its checkpoints may listen elsewhere now, and
        knows at best the membership of its last checkpoint. Workers learn the
        new address from their heartbeat replies.
        """
        for run in self.runs.values():
            if shard >= len(run.shards):
                continue
            if run.shards[shard] != addr:
                self._note(run.job_id, "shard_moved", f"shard {shard} is now at {addr}", level=logging.WARNING,
                           shard=shard, addr=addr)
                run.shards[shard] = addr
                self._persist(out, run.record, shards=list(run.shards))
            self.sent.pop((run.job_id, shard), None)  # send it again

    def on_heartbeat(self, req: Request, out: list) -> None:
        msg, now = req.msg, req.now
        if msg.role == "server":
            shard = msg.state.get("shard")
            peer = self.servers.get(shard) if isinstance(shard, int) and not isinstance(shard, bool) else None
            if peer is None or msg.state.get("addr") != peer.addr:
                # Not the shard registered under that id (one waiting to take it over): it keeps
                # registering; its beats must not keep the registered one alive.
                self._ok(out, req, {"reregister": True})
                return
            if req.identity is not None and req.identity != peer.identity:
                raise ProtocolError(ErrorCode.FORBIDDEN, f"heartbeat from {req.identity.user_id} refused: shard "
                                    f"{shard} registered with another key", rid=msg.rid)
            peer.last_seen, peer.stats = now, checks.shard_stats(msg.state)
            self._shard_checkpoints(peer, msg.state, out)
            self._ok(out, req, {})
            return
        peer = self.workers.get(msg.worker)
        if peer is None:
            self._ok(out, req, {"reregister": True, "stop": True})
            return
        peer.last_seen = now
        run = self.runs.get(msg.job) if msg.job else None
        if run is not None and peer.job == run.job_id:
            if run.progress(peer.id, checks.part_states(msg.state.get("parts"), msg.rid)):
                self._training_moved(run, now)
        self._ok(out, req, self.worker_view(peer, msg.job))

    def worker_view(self, peer: WorkerPeer, job: str) -> dict:
        """What a worker in `job` should know: stop?, where the shards are, what it holds now."""
        run = self.runs.get(job) if job else None
        if not job:
            return {"stop": False}
        mine = run is not None and peer.job == job
        held = run.held_by(peer.id) if mine else []
        evaluating = mine and run.eval_worker == peer.id
        pending = mine and (peer.id in run.joining or not run.ready(peer.id) or peer.id not in run.told)
        body: dict = {"stop": not mine or run.stopping or not (held or evaluating or pending)}
        if run is not None:
            body["shards"] = list(run.shards)
        if mine and run.ready(peer.id):
            # epoch: what every shard knows (`partitions` holds from it on); latest: the newest epoch.
            body.update(epoch=run.acked_epoch(), latest=run.epoch, partitions=held,
                        release=[k for k in held if run.partitions[k].release])
        return body

    # --- assignments ---

    def on_assign(self, req: Request, out: list) -> None:
        msg, now = req.msg, req.now
        peer = self.workers.get(msg.worker)
        if peer is None:
            raise ProtocolError(ErrorCode.BAD_STATE, f"worker {msg.worker!r:.60} is not registered", rid=msg.rid)
        peer.last_seen = now
        run = self.runs.get(peer.job) if peer.job else None
        if run is not None and msg.job != run.job_id and peer.id in run.told and peer.id not in run.joining:
            # It asks for new work while it had a part in this job: it left it.
            self._leave(run, peer)
        elif run is None:
            peer.job = None
        earlier = peer.waiting
        if earlier is not None and earlier.rid != msg.rid:  # a new question: the old one is answered, empty
            out.append(Reply(earlier.peer, Ok(rid=earlier.rid, body={"task": None})))
        peer.waiting = Held(req.peer, msg.rid, now + min(max(msg.wait_s, 0.0), ASSIGN_WAIT_MAX_S))

    def _answer_ready(self, out: list) -> None:
        """Answer held `assign`s whose answer is known: a grant every shard acknowledged, or an evaluation."""
        for peer in self.workers.values():
            held = peer.waiting
            if held is None or peer.job is None:
                continue
            run = self.runs.get(peer.job)
            if run is None:
                peer.job = None
                continue
            if run.eval_worker == peer.id:
                if not run.ready(peer.id):
                    continue
                assignment = self._assignment(run, peer.id, EVAL)
            elif peer.id in run.joining or not run.ready(peer.id):
                continue
            elif not run.held_by(peer.id):
                peer.job = None  # everything it held went elsewhere meanwhile: it is free again
                continue
            else:
                assignment = self._assignment(run, peer.id, TRAIN)
            run.told.add(peer.id)
            peer.waiting = None
            out.append(Reply(held.peer, Ok(rid=held.rid, job=run.job_id, body=assignment.to_wire())))
            what = (f"partitions {','.join(map(str, assignment.partitions))}" if assignment.task == TRAIN
                    else "the final evaluation")
            self._note(run.job_id, "assigned", f"{peer.id} assigned {what}" + (" (initialises the parameters)"
                                                                              if assignment.init else ""),
                       worker=peer.id, task=assignment.task, partitions=list(assignment.partitions))

    def _assignment(self, run: JobRun, worker: str, task: str) -> Assignment:
        steps = [p.steps for p in run.partitions]
        return Assignment(task=task, job=run.job_id, spec=run.spec, shards=list(run.shards),
                          partitions=run.held_by(worker) if task == TRAIN else [],
                          num_partitions=len(run.partitions),
                          steps=steps if all(s is not None for s in steps) else [],
                          init=task == TRAIN and run.init_worker == worker and not run.initialized,
                          plan=run.plan.to_wire() if run.plan else None, nonlearned=list(run.record.nonlearned),
                          epoch=run.acked_epoch(), max_model_bytes=self.max_model_bytes,
                          shard_keys=[self._shard_key(k, addr) for k, addr in enumerate(run.shards)],
                          max_message_bytes=self._message_limit(run.shards))

    # --- submissions ---

    def on_submit(self, req: Request, out: list) -> None:
        msg, now = req.msg, req.now
        sid = msg.submission_id
        if len(sid) > MAX_SUBMISSION_ID_CHARS or not sid.isprintable():
            raise checks.bad(f"submission_id must be at most {MAX_SUBMISSION_ID_CHARS} printable characters",
                             msg.rid)
        if sid and sid in self.submissions:  # a retried submit: the job it made the first time
            job = self.submissions[sid]
            self._ok(out, req, {"job": job, "existing": True}, job=job)
            return
        try:
            spec = validate_job(msg.spec)
        except SpecError as exc:
            raise ProtocolError(ErrorCode.BAD_SPEC, str(exc), rid=msg.rid) from None
        least = min_param_bytes(spec)
        if self.max_model_bytes and least > self.max_model_bytes:
            exact = spec["model"]["kind"] == "mlp" and known_data(spec["data"]["source"]) is not None
            raise ProtocolError(ErrorCode.BAD_SPEC, f"model: its parameters {'take' if exact else 'need at least'} "
                                f"{least:,} bytes, over this scheduler's limit of {self.max_model_bytes:,} "
                                "(--max-model-bytes)", rid=msg.rid)
        limit = self._message_limit([peer.addr for peer in self.servers.values()], by_id=False)
        if limit and spec["partition_bytes"] > limit - limit // 4:  # worker/client.py, piece_bound
            raise ProtocolError(ErrorCode.BAD_SPEC, f"partition_bytes: {spec['partition_bytes']:,} is more than a "
                                f"slice may be under the servers' --max-message-bytes of {limit:,}: at most "
                                f"{limit - limit // 4:,}", rid=msg.rid)
        checks.init_source(spec, self.jobs, msg.rid)
        seq = self.next_seq
        self.next_seq += 1
        record = JobRecord(id=f"{spec['name']}-{seq}", seq=seq, name=spec["name"], state=QUEUED, spec=spec,
                           submitted=self._wall(now), submission_id=sid)
        self.jobs[record.id] = record
        if sid:
            self.submissions[sid] = record.id
        out.append(Persist(record.id, record.row(), new=True))  # on disk before the answer
        self.metrics.inc("jobs_submitted_total")
        self._note(record.id, "submitted", f"submitted: {spec['workers']} partitions", partitions=spec["workers"])
        self._ok(out, req, {"job": record.id}, job=record.id)

    # --- shards ---

    def _flush_memberships(self, out: list) -> None:
        """Send each running job's newest epoch to every shard that has not had it."""
        for run in self.runs.values():
            for k, addr in enumerate(run.shards):
                if self.sent.get((run.job_id, k), 0) >= run.epoch:
                    continue
                workers, holders = run.members()
                call = next(self._call_ids)
                self.calls[call] = ("membership", run.job_id, k, run.epoch)
                self.sent[(run.job_id, k)] = run.epoch
                out.append(CallShard(call, addr, Membership(job=run.job_id, epoch=run.epoch, workers=workers,
                                                            holders=holders, readers=run.readers()),
                                     key=self._shard_key(k, addr)))

    def _message_limit(self, shards: list[str], *, by_id: bool = True) -> int:
        """The least --max-message-bytes the job's shards (plan shard k at shards[k]; with
        `by_id` False, any live server at one of `shards`) registered with (0: none told)."""
        limits = []
        live = {peer.addr: peer for peer in self.servers.values()}
        for k, addr in enumerate(shards):
            peer = self.servers.get(k) if by_id else live.get(addr)
            told = peer.info.get("max_message_bytes", "") if peer is not None and peer.addr == addr else ""
            if told.isdigit() and int(told) > 0:
                limits.append(int(told))
        return min(limits, default=0)

    def _shard_key(self, shard: int, addr: str) -> str:
        """The CURVE public key of the shard at `addr` ("": none known, or CURVE off)."""
        peer = self.servers.get(shard)
        return peer.key if peer is not None and peer.addr == addr else ""

    def on_evict(self, req: Request, out: list) -> None:
        """An admin declares a shard dead now (a server that cannot come back takes its id at once)."""
        peer = self.servers.pop(req.msg.shard, None)
        if peer is None:
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"no live shard {req.msg.shard}", rid=req.msg.rid)
        self.evicted[peer.shard] = (peer.addr, peer.info.get("instance", ""))
        log.warning("shard evicted", extra={"shard": peer.shard, "addr": peer.addr})
        for run in self.runs.values():
            if peer.shard < len(run.shards) and run.shards[peer.shard] == peer.addr:
                self._note(run.job_id, "shard_evicted", f"shard {peer.shard} at {peer.addr} evicted by an admin",
                           level=logging.WARNING, shard=peer.shard)
        self._ok(out, req, {"shard": peer.shard, "addr": peer.addr})

    def _shard_answer(self, event: ShardAnswer, out: list) -> None:
        call = self.calls.pop(event.call, None)
        if call is None or call[0] not in ("membership", "create", "restore"):
            return
        kind, job, k, epoch = call
        run = self.runs.get(job)
        if run is None:
            return
        if kind == "create":
            self._created(run, k, event.reply, out)
            return
        if kind == "restore":
            self._restored(run, k, epoch, event.reply, out)  # `epoch` holds the version asked
            return
        if isinstance(event.reply, Ok):
            run.acked[k] = max(run.acked.get(k, 0), epoch)
        elif self.sent.get((job, k)) == epoch:
            self.sent.pop((job, k), None)  # refused or unanswered: the next settle sends it again
            if isinstance(event.reply, Error):
                self._note(job, "shard_refused", f"shard {k} refused a membership: {event.reply.message}",
                           level=logging.WARNING, shard=k)

    # --- time ---

    def _tick(self, now: float, out: list) -> None:
        for peer in list(self.workers.values()):
            if now - peer.last_seen > self.heartbeat_timeout_s:
                self._worker_died(peer, now)
        for shard, peer in list(self.servers.items()):
            if now - peer.last_seen > self.heartbeat_timeout_s:
                log.warning("server is silent: declared dead", extra={"shard": shard, "addr": peer.addr})
                del self.servers[shard]
                for run in self.runs.values():
                    if shard < len(run.shards) and run.shards[shard] == peer.addr:
                        self._note(run.job_id, "shard_lost", f"shard {shard} at {peer.addr} is silent: declared "
                                   "dead (the job waits for a server to take its id)", level=logging.WARNING,
                                   shard=shard)
        for peer in self.workers.values():
            held = peer.waiting
            if held is not None and peer.job is None and now >= held.deadline:
                peer.waiting = None
                out.append(Reply(held.peer, Ok(rid=held.rid, body={"task": None})))
        if now - self._sampled_at >= CURVE_SAMPLE_INTERVAL_S:
            self._sampled_at = now
            for run in self.runs.values():
                run.sample(now)
        if now - self._saved_at >= PROGRESS_SAVE_INTERVAL_S:
            self._saved_at = now
            for run in self.runs.values():
                self._persist(out, run.record, progress=run.progress_record(now))
        self.metrics.set("workers", len(self.workers))
        self.metrics.set("servers", len(self.servers))
        self.metrics.set("jobs_running", len(self.runs))

    def _worker_died(self, peer: WorkerPeer, now: float) -> None:
        log.warning("worker is silent: declared dead", extra={"worker": peer.id})
        del self.workers[peer.id]
        run = self.runs.get(peer.job) if peer.job else None
        if run is None:
            return
        why = f"worker {peer.id} stopped answering (silent for over {self.heartbeat_timeout_s:g}s)"
        held = run.held_by(peer.id)
        self._note(run.job_id, "worker_lost", why + (f": partitions {','.join(map(str, held))} go to others"
                                                     if held else ""), level=logging.WARNING, worker=peer.id)
        if run.eval_worker == peer.id:
            run.eval_failures += 1
            if run.eval_failures >= self.max_failures:
                self._fail(run, f"the final evaluation failed: {why}")
        self._count_failures(run, held, why)
        self._leave(run, peer)

    # --- endings ---

    def _finish_runs(self, now: float, out: list) -> None:
        for run in list(self.runs.values()):
            if run.final is not None and (not run.active() or run.stopped_by == "target"):
                self._end(run, SUCCEEDED, now, out)
            elif (run.cancelled or run.error) and run.training_finished() and run.eval_worker is None:
                self._end(run, CANCELLED if run.cancelled else FAILED, now, out)

    def _end(self, run: JobRun, state: str, now: float, out: list) -> None:
        if run.train_ended is None:
            run.train_ended = now
        run.sample(now)
        record = run.record
        fields = {"result": run.result(now), "progress": run.progress_record(now), "error": run.error}
        if record.state not in FINAL_STATES:
            fields.update(state=state, finished=self._wall(now))
        self._persist(out, record, **fields)
        del self.runs[run.job_id]
        for k in range(len(run.shards)):
            self.sent.pop((run.job_id, k), None)
        for peer in self.workers.values():
            if peer.job == run.job_id:
                peer.job = None
        if run.spec.get("checkpoint_every"):
            for k, addr in enumerate(run.shards):  # a last checkpoint of the final values, where shards keep them
                call = next(self._call_ids)
                self.calls[call] = ("checkpoint", run.job_id, -1, 0)
                out.append(CallShard(call, addr, Checkpoint(job=run.job_id), key=self._shard_key(k, addr)))
        self.metrics.inc("jobs_finished_total", state=record.state)
        done, asked = sum(p.done_steps for p in run.partitions), sum(p.steps or 0 for p in run.partitions)
        acc = (run.final or {}).get("test_accuracy")
        self._note(run.job_id, "ended", f"{record.state}: {done:,}/{asked:,} steps"
                   + (" (stopped at the target accuracy)" if run.stopped_by == "target" else "")
                   + (f", test accuracy {acc:.4f}" if acc is not None else "")
                   + (f" ({run.error})" if run.error and record.state != CANCELLED else ""),
                   state=record.state, steps_done=done, test_accuracy=acc)

