"""The server shard daemon (`psctl server`): one ROUTER, one loop, an op table.

Holds, for every job, its slices of every parameter tensor, their optimizer
state and the job's clock table (via the job's consistency policy). Every
message is decoded and validated before use; a bad one is answered with an
`error` reply, counted, and the shard goes on serving (README.md, "Wire
protocol"). One loop, no locks: checkpoint files are written and read by
one background thread that shares nothing with the loop but the snapshots
and tasks handed to it (ps/checkpoint_writer.py, ps/shard_checkpoints.py);
the metrics exporter only reads.

Requests are safe to repeat: a push is identified by
(job, worker, rid); a repeated one is answered from the last reply instead
of being applied twice, and a repeated parked pull takes over the old one's
place with the new socket's identity.

Constructing a shard binds its socket and nothing else. `start()` (called
by `serve()` if the caller did not) claims a shard id from the scheduler when
none was given, restores checkpoints and registers; everything said to the
scheduler goes through the shard's SchedulerLink (ps/scheduler_link.py).
The shard is ready (`on_ready` is called, once, from its loop) when the
scheduler has answered its registration, or when it serves if it has no
scheduler.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import zmq

from protocol.codec import encode
from protocol.compression import wire_slices
from protocol.errors import ErrorCode, ProtocolError
from protocol.jobspec import MAX_WORKERS
from protocol.keys import ServerKeys
from protocol.messages import Membership, Message, Ok, PushPull
from protocol.metrics import MetricsRegistry
from protocol.partitions import partition_key
from protocol.plan import Plan
from protocol.validate import check_job_id, check_payload, check_sids
from protocol.version import DEFAULT_MAX_MESSAGE_BYTES
from ps.access import SHARD_ALLOWED, check_member, check_read
from ps.checkpoint import BadCheckpoint
from ps.hosts import advertised_endpoint
from ps.optim import make_optimizer
from ps.pieces import PieceLedger
from ps.policy import Accumulate, Answer, Apply, ApplyMean, Duplicate, Park, Refuse, Release, make_policy
from ps.reshard import resharded_table
from ps.router import RouterDaemon
from ps.scheduler_link import CLAIM_TIMEOUT_S, SchedulerLink
from ps.shard_checkpoints import ShardCheckpoints
from ps.table import JobTable
from ps.transport import bind_router, stop_authenticator

log = logging.getLogger("pscluster.server")


# Bounds on what a request may ask a shard to hold or loop over.
MAX_CHECKPOINT_EVERY = 10**9
MAX_EPOCH = 1 << 48                 # the scheduler's epochs: incarnation x 2**24 + a counter
MAX_MEMBERS = MAX_WORKERS * 4       # partitions of a job, or legacy worker members
# Memberships held for tables not created yet (a shard restarted without its
# checkpoint hears the membership before the create): a few jobs at a time,
# the oldest forgotten first, so messages for jobs that never come cannot
# grow the shard (each may name 3 x MAX_MEMBERS ids).
MAX_PENDING_MEMBERSHIPS = 16
# Memory a shard holds for tables by default: half of this machine's.
MEMORY_SHARE_FOR_TABLES = 2


def default_max_table_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MEMORY_SHARE_FOR_TABLES
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class Shard(RouterDaemon, ShardCheckpoints):
    """One parameter-server shard. `serve()` blocks until shutdown or `stop()`."""

    ROLE = "server shard"
    ALLOWED = SHARD_ALLOWED
    log = log

    def __init__(self, shard_id: int | None, bind: str, *, ctx: zmq.Context | None = None,
                 scheduler: str | None = None, advertise: str | None = None,
                 checkpoint_dir: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 registry: MetricsRegistry | None = None, clock: Callable[[], float] = time.monotonic,
                 claim_timeout_s: float = CLAIM_TIMEOUT_S, keys: ServerKeys | None = None,
                 max_table_bytes: int | None = None):
        if shard_id is None and not scheduler:
            raise RuntimeError("a server without --shard-id needs --scheduler to assign it one")
        self.shard_id = shard_id
        self.ctx = ctx or zmq.Context.instance()
        self.keys = keys
        self.sock, self.endpoint = bind_router(self.ctx, bind, keys)
        try:  # ps/hosts.py: --advertise, else the bound address, else DMLC_NODE_HOST/DMLC_INTERFACE/route/name
            self.advertise = advertised_endpoint(self.endpoint, advertise=advertise, scheduler=scheduler,
                                                 bound=self.endpoint)
        except RuntimeError:
            self.sock.close(0)
            stop_authenticator(self.ctx)
            raise
        self.checkpoint_dir = checkpoint_dir
        self.max_message_bytes = max_message_bytes
        # Parameters and optimizer state this shard agrees to hold, all jobs together (0: no limit).
        self.max_table_bytes = default_max_table_bytes() if max_table_bytes is None else max_table_bytes
        self.metrics = registry or MetricsRegistry("server")
        self.now = clock
        self.tables: dict[str, JobTable] = {}
        self.pending_membership: dict[str, Membership] = {}   # for tables not created yet
        self.memberships: dict[str, Membership] = {}  # each table's latest, applied again after a `restore`
        self.parked: dict[tuple, tuple] = {}      # token -> (envelope, msg, sids)
        self.last_reply: dict[tuple, tuple] = {}  # (job, worker) -> (rid, frames or None)
        self.stopping = False
        self.scheduler_addr = scheduler
        self.claim_timeout_s = claim_timeout_s
        self._init_checkpoints()
        self.link = SchedulerLink(self.ctx, scheduler, advertise=self.advertise, shard=shard_id,
                                  jobs=self._job_summaries, restored=self.restored,
                                  max_message_bytes=max_message_bytes,
                                  checkpoints=self._checkpoint_lists if checkpoint_dir else None,
                                  keys=keys.client(keys.ring.scheduler_key()) if keys else None) if scheduler else None
        self._started = False
        self.on_ready: Callable[[], None] | None = None  # called once from the loop: registered, or serving
        self.ops = {
            "create": self.on_create, "load": self.on_load, "pull": self.on_pull, "push": self.on_push,
            "push_pull": self.on_push_pull, "membership": self.on_membership, "stats": self.on_stats,
            "checkpoint": self.on_checkpoint, "restore": self.on_restore, "reshard": self.on_reshard,
            "drop": self.on_drop,
            "shutdown": self.on_shutdown,
        }
        self._staleness_hists: dict = {}  # job -> its staleness histogram
        self.ledger = PieceLedger()  # slices applied of steps that come in pieces (ps/pieces.py)
        self._repeats: set = set()         # push tokens a policy answered as Duplicate
        self._parked_gauge = 0
        self.metrics.set("parked_pulls", 0)

    # --- lifecycle ---

    def start(self) -> None:
        """Startup, once: claim a shard id if none was given (bounded by claim_timeout_s),
        restore checkpoints, register with the scheduler.

        RuntimeError (the sockets closed) if the scheduler gives no id in time.
        """
        if self._started:
            return
        self._started = True
        registered = False
        if self.shard_id is None:
            try:
                self.shard_id = self.link.claim(self.claim_timeout_s)
            except RuntimeError:
                self.close()
                raise
            registered = True
        if self.checkpoint_dir:
            self._start_checkpoints()
        if self.link is not None and (not registered or self.restored):
            self.link.register()  # (again, after a claim: what was restored is news to the scheduler)

    def serve(self) -> None:
        """Answer requests until `shutdown` arrives or `stop()` is called; then close the sockets."""
        self.start()
        link_sock = self.link.connect() if self.link is not None else None
        others = {link_sock: self.link.on_readable} if link_sock is not None else {}
        if self.writer is not None:  # a pipe: readable when the writer thread finished something
            others[self.writer.fileno()] = self._on_writer
        log.info("serving", extra={"shard": self.shard_id, "addr": self.endpoint})
        if self.link is None or self.link.registered:
            self._ready()
        else:
            self.link.on_registered = self._ready
        self._serve_loop(lambda: others)

    def _ready(self) -> None:
        if self.on_ready is not None:
            self.on_ready()

    def stop(self) -> None:
        self.stopping = True

    def close(self) -> None:
        self._close_checkpoints()  # bounded: the writes it queued, then the sockets
        self.sock.close(0)
        if self.keys is not None:
            stop_authenticator(self.ctx)
        if self.link is not None:
            self.link.close()

    def tick(self, now: float) -> None:
        """Periodic work: heartbeats to the scheduler. Time is passed in, so tests move it by hand."""
        link = self.link
        if link is not None and now >= link.next_beat:  # checked here: no call per message when none is due
            link.tick(now)

    # --- dispatch (decode, op table, errors: ps/router.py) ---

    def _table(self, msg: Message, *, loaded: bool = True) -> JobTable:
        """The job's table; with `loaded`, one that has its values (not only created)."""
        table = self.tables.get(msg.job)
        if table is None:
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"no table for job {msg.job!r:.60} on shard {self.shard_id}",
                                rid=msg.rid)
        if loaded and not table.loaded:
            raise ProtocolError(ErrorCode.BAD_STATE, f"job {msg.job!r:.60} has no values on shard {self.shard_id} "
                                "yet (its initialising worker loads them)", rid=msg.rid)
        return table

    # --- table creation and removal ---

    def on_reshard(self, envelope: list, msg) -> None:
        """The job's table under a plan of another shard count, from its old shards' checkpoint files
        (ps/reshard.py). Read on the loop: it happens once, as the job starts again."""
        check_job_id(msg.job, rid=msg.rid)
        if not self.checkpoint_dir:
            raise ProtocolError(ErrorCode.BAD_STATE, "this shard runs without --checkpoint-dir", rid=msg.rid)
        try:
            new, old = Plan.from_wire(msg.plan), Plan.from_wire(msg.old_plan)
        except ProtocolError as exc:
            raise ProtocolError(ErrorCode.BAD_PLAN, exc.message, rid=msg.rid) from None
        if not 0 <= self.shard_id < new.num_shards:
            raise ProtocolError(ErrorCode.BAD_PLAN, f"plan has {new.num_shards} shards; this is shard "
                                f"{self.shard_id}", rid=msg.rid)
        try:
            table = resharded_table(self.checkpoint_dir, msg.job, msg.version, old, new, self.shard_id)
        except (BadCheckpoint, ValueError) as exc:
            raise ProtocolError(ErrorCode.BAD_STATE, f"cannot cut job {msg.job!r} onto {new.num_shards} shards "
                                f"from version {msg.version}: {exc}", rid=msg.rid) from None
        for token in [t for t in self.parked if t[0] == msg.job]:
            env, req, _sids = self.parked.pop(token)
            self._reject(env, ProtocolError(ErrorCode.REASSIGNED, f"job {msg.job!r} was cut onto another shard "
                                            "count: ask the scheduler again", rid=req.rid), job=msg.job)
        self.tables[msg.job] = table
        self.ckpt_versions[msg.job] = []   # the files here are the old layout's
        latest = self.memberships.get(msg.job) or self.pending_membership.pop(msg.job, None)
        if latest is not None and latest.epoch > table.policy.epoch:
            self._apply_membership(table, latest)
        log.info("table cut onto a new plan", extra={"job": msg.job, "version": table.version,
                                                     "shards": new.num_shards, "was": old.num_shards})
        self._send(envelope, encode(Ok(rid=msg.rid, job=msg.job, body={
            "job": msg.job, "version": table.version, "clocks": dict(table.policy.clocks)})))

    def _values_of(self, job: str, plan, rid: int) -> dict:
        """Copies of job `job`'s values here, to start another job with the same plan from them
        (`init_from: job:ID`); its optimizer state and clocks stay with it."""
        source = self.tables.get(job)
        if source is None:
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"init_from: job {job!r:.60} has no table on shard "
                                f"{self.shard_id} (dropped, or this server restarted without its checkpoint)",
                                rid=rid)
        if source.plan.digest != plan.digest:
            raise ProtocolError(ErrorCode.BAD_PLAN, f"init_from: job {job!r:.60} has another plan", rid=rid)
        return dict(source.values)  # JobTable copies what it is given

    def on_create(self, envelope: list, msg) -> None:
        check_job_id(msg.job, rid=msg.rid)
        plan = _plan_or_error(msg)
        if not 0 <= self.shard_id < plan.num_shards:
            raise ProtocolError(ErrorCode.BAD_PLAN, f"plan has {plan.num_shards} shards; this is shard {self.shard_id}",
                                rid=msg.rid)
        existing = self.tables.get(msg.job)
        if existing is not None:
            if existing.plan.digest != plan.digest:
                raise ProtocolError(ErrorCode.EXISTS, f"job {msg.job!r} exists here with another plan", rid=msg.rid)
            self._send(envelope, encode(Ok(rid=msg.rid, job=msg.job,
                                           body={"existed": True, "version": existing.version})))
            return
        try:
            optimizer = make_optimizer(msg.optimizer or {"kind": "sgd", "lr": 0.1})
            policy = make_policy(msg.policy or {"policy": "asp"})
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_SPEC, str(exc), rid=msg.rid) from None
        unknown = sorted(set(msg.nonlearned) - set(plan.names))
        if unknown:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"nonlearned tensor {unknown[0]!r:.60} is not in the plan",
                                rid=msg.rid)
        if not 0 <= msg.checkpoint_every <= MAX_CHECKPOINT_EVERY:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"checkpoint_every must be in 0..{MAX_CHECKPOINT_EVERY}",
                                rid=msg.rid)
        held = {s.sid: s for s in plan.slices_on(self.shard_id)}
        self._check_room(msg, sum(s.nbytes for s in held.values()) * (1 + optimizer.state_copies))
        if msg.slices or not held:  # the values now, or (none: the scheduler creates) in a `load`
            check_payload(msg.slices, held, rid=msg.rid, job=msg.job, complete=True)
        initial = {sl.sid: sl.data for sl in msg.slices} if msg.slices or not held else None
        if msg.init_from:
            initial = self._values_of(msg.init_from, plan, msg.rid)
        table = JobTable(msg.job, plan, self.shard_id, optimizer, policy, nonlearned=msg.nonlearned,
                         initial=initial, checkpoint_every=msg.checkpoint_every)
        self.tables[msg.job] = table
        self.ledger.drop_job(msg.job)
        pending = self.pending_membership.pop(msg.job, None)
        if pending is not None:
            self._apply_membership(table, pending)
        log.info("table created", extra={"job": msg.job, "slices": len(held), "bytes": table.bytes,
                                         "policy": policy.name, "optimizer": optimizer.spec["kind"]})
        self._send(envelope, encode(Ok(rid=msg.rid, job=msg.job, body={"existed": False, "version": table.version,
                                                                      "slices": len(held)})))

    def _check_room(self, msg, nbytes: int) -> None:
        """A new table must fit beside the others under max_table_bytes (parameters and optimizer state)."""
        held = sum(t.bytes * (1 + t.optimizer.state_copies) for t in self.tables.values())
        if self.max_table_bytes and held + nbytes > self.max_table_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"job {msg.job!r:.60} needs {nbytes:,} bytes on shard "
                                f"{self.shard_id}, which holds {held:,} of its limit of {self.max_table_bytes:,} "
                                "(--max-table-bytes)", rid=msg.rid)

    def on_load(self, envelope: list, msg) -> None:
        """Initial values of a table created without them, in pieces; once loaded whole, a repeat
        (or any later load) is answered, not applied."""
        table = self._table(msg, loaded=False)
        check_member(self.identity, msg, table)
        if not table.loaded:
            check_payload(msg.slices, table.held, rid=msg.rid, job=msg.job)
            if table.load(msg.slices):
                log.info("table loaded", extra={"job": msg.job, "worker": msg.worker, "bytes": table.bytes})
        self._send(envelope, encode(Ok(rid=msg.rid, job=msg.job, body={"version": table.version,
                                                                      "loaded": table.loaded})))

    def on_drop(self, envelope: list, msg) -> None:
        table = self.tables.pop(msg.job, None)
        self.pending_membership.pop(msg.job, None)
        self.memberships.pop(msg.job, None)
        self._staleness_hists.pop(msg.job, None)
        self.ledger.drop_job(msg.job)
        self.metrics.forget_job(msg.job)  # its series end with its table
        if table is not None:
            for token in [t for t in self.parked if t[0] == msg.job]:
                env, req, _sids = self.parked.pop(token)
                self._reject(env, ProtocolError(ErrorCode.UNKNOWN_JOB, f"job {msg.job!r} was dropped", rid=req.rid))
            for key in [k for k in self.last_reply if k[0] == msg.job]:
                del self.last_reply[key]
        frames = encode(Ok(rid=msg.rid, job=msg.job, body={"dropped": table is not None}))
        if self.writer is not None:
            check_job_id(msg.job, rid=msg.rid)
            # Answered once the files are gone, after any write of the job still queued.
            self._remove_checkpoints(msg.job, lambda: self._send(envelope, frames))
            return
        self._send(envelope, frames)

    # --- data path ---

    def on_pull(self, envelope: list, msg) -> None:
        table = self._table(msg)
        check_sids(msg.sids, table.held, rid=msg.rid, job=msg.job)
        if msg.clock < 0:
            check_read(self.identity, msg, table)
        else:
            check_member(self.identity, msg, table)
        self.metrics.inc("pulls_total")
        table.pulls += 1
        if msg.clock < 0:
            self._answer(table, envelope, msg, msg.sids)
            return
        token = (msg.job, "pull", msg.worker, msg.rid)
        if token in self.parked:  # a retry of a parked pull: answer the new socket instead
            self.parked[token] = (envelope, msg, msg.sids)
            return
        self._run(table, table.policy.on_pull(msg.worker, msg.clock, token), {token: (envelope, msg, msg.sids)})

    def on_push(self, envelope: list, msg) -> None:
        self._push(envelope, msg)

    def on_push_pull(self, envelope: list, msg) -> None:
        self._push(envelope, msg)

    def _push(self, envelope: list, msg) -> None:
        table = self._table(msg)
        check_member(self.identity, msg, table)
        key = (msg.job, msg.worker)
        pull_token = (msg.job, "pull", msg.worker, msg.rid)
        last = self.last_reply.get(key) if msg.worker else None
        if last is not None and last[0] == msg.rid:
            self.metrics.inc("duplicates_total")
            self._answer_duplicate(table, envelope, msg, last[1], pull_token)
            return
        if msg.base_version < -1 or not (msg.norm >= 0 or msg.norm == -1):
            raise ProtocolError(ErrorCode.BAD_FIELD, "base_version must be >= -1 and norm >= 0 (or -1: not computed)",
                                rid=msg.rid)
        slices = wire_slices(msg.slices, table.held, msg.coding, rid=msg.rid, job=msg.job)
        if isinstance(msg, PushPull):
            check_sids(msg.sids, table.held, rid=msg.rid, job=msg.job)
        push_token = (msg.job, "push", msg.worker, msg.rid)
        if len(msg.parts) > MAX_WORKERS or any(p < 0 for p in msg.parts):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"parts must be at most {MAX_WORKERS} partition indices >= 0",
                                rid=msg.rid)
        keys = [partition_key(p) for p in msg.parts] if msg.parts else ()
        members = keys or (msg.worker,)
        exact = table.policy.name == "bsp"
        if getattr(msg, "more", False):
            self._piece(table, envelope, msg, keys, members, slices)
            return
        fresh = self.ledger.fresh(msg.job, msg.worker, members, msg.clock, msg.rid, slices, exact=exact)
        refused = self._run(table, table.policy.on_push(msg.worker, msg.clock, push_token,
                                                        base_version=msg.base_version, keys=keys),
                            {push_token: (envelope, msg, fresh)})
        if push_token in refused:
            return
        self.ledger.finish(msg.job, members)
        self.metrics.inc("duplicates_total" if push_token in self._repeats else "pushes_total")
        self._repeats.discard(push_token)
        if not isinstance(msg, PushPull):
            frames = encode(Ok(rid=msg.rid, job=msg.job, body=self._body(table, msg.worker)))
            if msg.worker:
                self.last_reply[key] = (msg.rid, frames)
            self._send(envelope, frames)
        else:
            if msg.worker:
                self.last_reply[key] = (msg.rid, None)
            table.pulls += 1
            self.metrics.inc("pulls_total")
            if msg.clock < 0:
                self._answer(table, envelope, msg, msg.sids)
            else:
                self._run(table, table.policy.on_pull(msg.worker, msg.clock + 1, pull_token),
                          {pull_token: (envelope, msg, msg.sids)})
        self._maybe_checkpoint(table)

    def _piece(self, table: JobTable, envelope: list, msg, keys, members, slices) -> None:
        """An early piece of a step (`more`): its slices applied or summed now, as its last piece
        will be (`Policy.admit`); the step counts at the last piece. A piece sent again is skipped."""
        action = table.policy.admit(msg.worker, msg.clock, None, base_version=msg.base_version, keys=keys)
        if isinstance(action, Refuse):
            raise ProtocolError(action.code, action.message, rid=msg.rid)
        if not isinstance(action, Duplicate):
            opt = table.optimizer
            fresh = self.ledger.fresh(msg.job, msg.worker, members, msg.clock, msg.rid, slices,
                                      exact=isinstance(action, Accumulate))
            if isinstance(action, Accumulate):
                table.accumulate(action.step, fresh, grad_scale=opt.clip_scale(msg.norm), weight=action.weight,
                                 count=False)
            else:
                table.apply(fresh, step=msg.clock if msg.clock >= 0 else table.version,
                            grad_scale=opt.clip_scale(msg.norm), lr_scale=opt.staleness_scale(action.staleness),
                            count=False)
            self.ledger.record(msg.job, msg.worker, members, msg.clock, msg.rid, fresh)
        self._send(envelope, encode(Ok(rid=msg.rid, job=msg.job, body=self._body(table, msg.worker))))

    def _answer_duplicate(self, table: JobTable, envelope: list, msg, frames: list | None, pull_token) -> None:
        """A repeated push: answer it again without applying it again."""
        if frames is not None:
            self._send(envelope, frames)
        elif pull_token in self.parked:
            self.parked[pull_token] = (envelope, msg, msg.sids)
        else:
            self._answer(table, envelope, msg, msg.sids)

    def _body(self, table: JobTable, worker: str) -> dict:
        policy = table.policy
        body = {"version": table.version, "clock": policy.clocks.get(worker, -1)}
        held = policy.held_by(worker)
        if held and worker not in held:  # a worker holding partitions: where each stands here
            body["held"] = {key: policy.clocks[key] for key in held}
        return body

    def _answer(self, table: JobTable, envelope: list, msg, sids) -> None:
        slices = table.read(sids)
        frames = encode(Ok(rid=msg.rid, job=msg.job, body=self._body(table, msg.worker), slices=tuple(slices)))
        trackers = self._send(envelope, frames, track=True)
        table.mark_inflight(slices, trackers)

    def _run(self, table: JobTable, actions: list, requests: dict) -> set:
        """Perform a policy's actions in order; returns the tokens it refused."""
        refused = set()
        for action in actions:
            if isinstance(action, Apply):
                _env, msg, fresh = requests[action.push]  # its slices not applied by earlier pieces
                opt = table.optimizer
                step = msg.clock if msg.clock >= 0 else max(0, table.version - 1)
                table.apply(fresh, step=step, grad_scale=opt.clip_scale(msg.norm),
                            lr_scale=opt.staleness_scale(action.staleness))
                table.record_staleness(action.staleness)
                hist = self._staleness_hists.get(table.job)
                if hist is None:  # looked up once per job: the labelled lookup sorts labels each time
                    hist = self._staleness_hists[table.job] = self.metrics.histogram("staleness", job_id=table.job)
                hist.observe(action.staleness)
            elif isinstance(action, Accumulate):
                _env, msg, fresh = requests[action.push]
                table.accumulate(action.step, fresh, grad_scale=table.optimizer.clip_scale(msg.norm),
                                 weight=action.weight)
            elif isinstance(action, Duplicate):
                self._repeats.add(action.push)  # answered as done; nothing applied
            elif isinstance(action, ApplyMean):
                table.apply_mean(action.step, action.count)
            elif isinstance(action, Answer):
                envelope, msg, sids = requests[action.pull]
                self._answer(table, envelope, msg, sids)
            elif isinstance(action, Park):
                self.parked[action.pull] = requests[action.pull]
            elif isinstance(action, Release):
                for token in action.pulls:
                    parked = self.parked.pop(token, None)
                    if parked is not None:
                        self._answer(table, *parked)
            elif isinstance(action, Refuse):
                ctx = requests.get(action.request) or self.parked.pop(action.request, None)
                refused.add(action.request)
                if ctx is not None:
                    self._reject(ctx[0], ProtocolError(action.code, action.message, rid=ctx[1].rid), job=table.job)
            else:  # pragma: no cover - a policy bug, surfaced loudly
                raise TypeError(f"unknown policy action {action!r}")
        if len(self.parked) != self._parked_gauge:
            self._parked_gauge = len(self.parked)
            self.metrics.set("parked_pulls", self._parked_gauge)
        return refused

    # --- control ---

    def on_membership(self, envelope: list, msg) -> None:
        if not 0 < msg.epoch <= MAX_EPOCH or len(msg.workers) > MAX_MEMBERS or len(msg.holders) > MAX_MEMBERS \
                or len(msg.readers) > MAX_MEMBERS or any(c < -1 for c in msg.workers.values()):
            raise ProtocolError(ErrorCode.BAD_FIELD, f"membership: epoch in 1..{MAX_EPOCH}, at most {MAX_MEMBERS} "
                                "members, holders and readers, start clocks >= -1", rid=msg.rid)
        table = self.tables.get(msg.job)
        if table is None:
            check_job_id(msg.job, rid=msg.rid)
            held = self.pending_membership.get(msg.job)
            if held is None or held.epoch < msg.epoch:
                self.pending_membership.pop(msg.job, None)
                self.pending_membership[msg.job] = msg
                while len(self.pending_membership) > MAX_PENDING_MEMBERSHIPS:
                    self.pending_membership.pop(next(iter(self.pending_membership)))
            self._send(envelope, encode(Ok(rid=msg.rid, job=msg.job, body={"epoch": msg.epoch, "pending": True})))
            return
        self._apply_membership(table, msg)
        log.info("membership", extra={"job": msg.job, "epoch": table.policy.epoch, "workers": len(msg.workers)})
        self._send(envelope, encode(Ok(rid=msg.rid, job=msg.job, body={"epoch": table.policy.epoch,
                                                                      "version": table.version})))
        self._maybe_checkpoint(table)

    def _apply_membership(self, table: JobTable, msg: Membership) -> None:
        if msg.epoch > table.policy.epoch:
            table.readers = frozenset(msg.readers)
        self._run(table, table.policy.on_membership(msg.epoch, dict(msg.workers), dict(msg.holders)), {})
        if table.policy.epoch == msg.epoch:
            self.memberships[table.job] = msg

    def on_stats(self, envelope: list, msg) -> None:
        # Answered once the checkpoint work asked before it is done, so the versions it lists are on disk.
        self._after_checkpoint_work(lambda: self._send(envelope, encode(Ok(rid=msg.rid, body=self._stats(msg.job)))))

    def _stats(self, only: str) -> dict:
        jobs = {job: t.summary() for job, t in self.tables.items() if not only or job == only}
        body = {
            "shard": self.shard_id,
            "addr": self.advertise,
            "jobs": jobs,
            "pushes": int(self.metrics.get("pushes_total")),
            "pulls": int(self.metrics.get("pulls_total")),
            "duplicates": int(self.metrics.get("duplicates_total")),
            "rejected": {code.value: int(self.metrics.get("rejected_total", code=code.value))
                         for code in ErrorCode if self.metrics.get("rejected_total", code=code.value)},
            "rejected_total": int(sum(self.metrics.get("rejected_total", code=c.value) for c in ErrorCode)),
            "bytes_received": int(self.metrics.get("bytes_received_total")),
            "bytes_sent": int(self.metrics.get("bytes_sent_total")),
            "parked": len(self.parked),
        }
        if self.writer is not None:
            body["checkpoints"] = {job: c for job, c in self._checkpoint_stats().items() if not only or job == only}
        return body

    def on_shutdown(self, envelope: list, msg) -> None:
        self._send(envelope, encode(Ok(rid=msg.rid, body={"shard": self.shard_id})))
        log.info("shutdown requested", extra={"shard": self.shard_id})
        self.stopping = True

    def _job_summaries(self) -> dict:
        """Every table's summary by job: what heartbeats tell the scheduler."""
        return {job: t.summary() for job, t in self.tables.items()}



def _plan_or_error(msg) -> Plan:
    try:
        return Plan.from_wire(msg.plan)
    except ProtocolError as exc:
        raise ProtocolError(exc.code, exc.message, rid=msg.rid) from None
