"""The scheduler daemon (`psctl scheduler`): jobs, membership, assignments.

One ROUTER for everyone (servers, workers, users), one loop, an op table.
Durable state (jobs) lives in sqlite (ps/registry.py); live state (who is
alive, who trains what) is rebuilt from registrations and heartbeats.

Liveness follows the ZeroMQ guide's Paranoid Pirate pattern: every peer
heartbeats; one silent for `heartbeat_timeout_s` is dead. A dead worker's
partition goes back to the pool and the job's shards get a new membership
epoch at once, so no barrier or parked pull waits for it.

Workers ask for work with a long poll (`assign`); the answer to a training
assignment is held until every shard of the job has acknowledged the
membership epoch that includes the worker, so its first push is never
refused as coming from a stranger.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from protocol.codec import encode
from protocol.messages import Checkpoint, Membership, Message, Ok
from protocol.metrics import Registry as Metrics
from protocol.plan import Plan
from ps import registry as reg
from ps.jobrun import EVAL, JobRun
from ps.router import RouterDaemon
from ps.scheduler_ops import SchedulerOps
from ps.shardlinks import ShardLinks
from ps.transport import bind_router

log = logging.getLogger("pscluster.scheduler")

# Peers heartbeat this often; the value is sent to them at registration.
HEARTBEAT_INTERVAL_S = 0.5
# Silent this long means dead. 3..5 intervals is reasonable; we allow more
# because a busy 2-core machine can stall a process for a second or two.
HEARTBEAT_TIMEOUT_S = 6.0
# Longest a worker's `assign` is held when there is nothing to do.
ASSIGN_WAIT_MAX_S = 30.0
# How often running jobs' progress is written to the registry.
PROGRESS_SAVE_INTERVAL_S = 2.0
# How often a running job's progress is sampled for its loss curve.
CURVE_SAMPLE_INTERVAL_S = 0.2
TICK_INTERVAL_S = 0.1
# Epochs are incarnation * EPOCH_STRIDE + counter, so a restarted scheduler's
# epochs are newer than anything the shards saw from the previous one.
EPOCH_STRIDE = 1 << 24


@dataclass
class Peer:
    """A registered server or worker."""

    role: str
    ident: str                      # worker id, or "shard-K"
    last_seen: float
    info: dict = field(default_factory=dict)
    addr: str = ""
    shard: int = -1
    state: dict = field(default_factory=dict)
    job: str | None = None          # a worker's current job


@dataclass
class Waiting:
    """A held request: a worker's `assign` long poll, or its answer waiting for membership acks."""

    envelope: list
    rid: int
    deadline: float
    reply: dict | None = None
    job: str = ""
    epoch: int = 0


class Scheduler(RouterDaemon, SchedulerOps):
    """The scheduler. `serve()` blocks until shutdown or `stop()`; handlers are in ps/scheduler_ops.py."""

    ROLE = "scheduler"
    log = log

    def __init__(self, bind: str, state_dir: str, *, ctx: zmq.Context | None = None,
                 heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.ctx = ctx or zmq.Context.instance()
        self.registry = reg.Registry(state_dir)
        self.sock, self.endpoint = bind_router(self.ctx, bind)
        self.links = ShardLinks(self.ctx)
        self.metrics = metrics or Metrics()
        self.now = clock
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.servers: dict[int, Peer] = {}
        self.workers: dict[str, Peer] = {}
        self.waiting: dict[str, Waiting] = {}        # worker -> its held assign
        self.runs: dict[str, JobRun] = {}
        self.acked: dict[tuple[str, int], int] = {}   # (job, shard index) -> newest epoch acknowledged
        self.stopping = False
        self.incarnation = self.registry.next_incarnation()
        self._progress_saved = 0.0
        self._sampled = 0.0
        requeued = self.registry.requeue_running()
        if requeued:
            log.info("requeued jobs left running by a previous scheduler", extra={"jobs": ",".join(requeued)})
        self.ops = {
            "register": self.on_register, "heartbeat": self.on_heartbeat, "assign": self.on_assign,
            "report": self.on_report, "submit": self.on_submit, "status": self.on_status,
            "cancel": self.on_cancel, "list": self.on_list, "export": self.on_export,
            "stats": self.on_stats, "shutdown": self.on_shutdown,
        }

    # --- lifecycle ---

    def serve(self) -> None:
        log.info("serving", extra={"addr": self.endpoint, "state": str(self.registry.path)})
        try:
            while not self.stopping:
                poller = zmq.Poller()
                poller.register(self.sock, zmq.POLLIN)
                for s in self.links.poll_sockets():
                    poller.register(s, zmq.POLLIN)
                events = dict(poller.poll(int(TICK_INTERVAL_S * 1000)))
                for sock in events:
                    if sock is self.sock:
                        self._drain()
                    else:
                        self.links.on_readable(sock)
                self.tick(self.now())
        finally:
            self.close()

    def stop(self) -> None:
        self.stopping = True

    def close(self) -> None:
        self.sock.close(0)
        self.links.close()
        self.registry.close()

    def _ok(self, envelope: list, msg: Message, body: dict) -> None:
        self._send(envelope, encode(Ok(rid=msg.rid, job=msg.job, body=body)))

    # --- periodic work ---

    def tick(self, now: float) -> None:
        """Liveness, long-poll expiry, re-sends, scheduling, progress saving (time passed in)."""
        self.links.tick(now)
        for worker, peer in list(self.workers.items()):
            if now - peer.last_seen > self.heartbeat_timeout_s:
                log.warning("worker is silent: declared dead", extra={"worker": worker})
                self._forget_worker(worker)
        for shard, peer in list(self.servers.items()):
            if now - peer.last_seen > self.heartbeat_timeout_s:
                log.warning("server is silent: declared dead", extra={"shard": shard, "addr": peer.addr})
                del self.servers[shard]
        for worker, wait in list(self.waiting.items()):
            if wait.reply is None and now >= wait.deadline:
                del self.waiting[worker]
                self._send(wait.envelope, encode(Ok(rid=wait.rid, body={"task": None})))
        self.schedule(now)
        self._finish_runs()
        if now - self._sampled >= CURVE_SAMPLE_INTERVAL_S:
            self._sampled = now
            for run in self.runs.values():
                run.sample(now)
        if now - self._progress_saved >= PROGRESS_SAVE_INTERVAL_S:
            self._progress_saved = now
            for run in self.runs.values():
                self.registry.update(run.job_id, progress=_progress_record(run))
        self.metrics.set("workers", len(self.workers))
        self.metrics.set("servers", len(self.servers))
        self.metrics.set("jobs_running", len(self.runs))

    # --- membership ---

    def _forget_worker(self, worker: str) -> None:
        peer = self.workers.pop(worker, None)
        self.waiting.pop(worker, None)
        if peer is not None and peer.job in self.runs:
            run = self.runs[peer.job]
            if run.lost(worker):
                self._send_membership(run)

    def _epoch(self, run: JobRun) -> int:
        return self.incarnation * EPOCH_STRIDE + run.epoch

    def _send_membership(self, run: JobRun) -> None:
        epoch = self._epoch(run)
        msg = Membership(job=run.job_id, epoch=epoch, workers=run.workers())
        for k, addr in enumerate(run.shards):
            def on_reply(reply, k=k, job=run.job_id, epoch=epoch):
                if isinstance(reply, Ok):
                    key = (job, k)
                    self.acked[key] = max(self.acked.get(key, 0), epoch)
                    self._release_assignments(job)
            self.links.request(addr, msg, on_reply, self.now())

    def _release_assignments(self, job: str) -> None:
        run = self.runs.get(job)
        if run is None:
            return
        acked = min(self.acked.get((job, k), 0) for k in range(len(run.shards)))
        for worker, wait in list(self.waiting.items()):
            if wait.reply is not None and wait.job == job and wait.epoch <= acked:
                del self.waiting[worker]
                self._send(wait.envelope, encode(Ok(rid=wait.rid, job=job, body=wait.reply)))

    # --- scheduling ---

    def schedule(self, now: float) -> None:
        """Give every waiting worker something to do, starting queued jobs when needed."""
        for worker in list(self.waiting):
            wait = self.waiting[worker]
            if wait.reply is not None:
                continue
            task = self._find_task()
            if task is None:
                return
            run, (kind, index) = task
            run.assign(worker, (kind, index))
            self.workers[worker].job = run.job_id
            reply = self._assignment(run, worker, kind, index)
            if kind == EVAL:
                del self.waiting[worker]
                self._send(wait.envelope, encode(Ok(rid=wait.rid, job=run.job_id, body=reply)))
            else:
                wait.reply, wait.job, wait.epoch = reply, run.job_id, self._epoch(run)
                self._send_membership(run)
            log.info("assigned", extra={"worker": worker, "job": run.job_id, "task": kind, "partition": index})

    def _find_task(self):
        for run in self.runs.values():
            task = run.next_task()
            if task is not None:
                return run, task
        for row in self.registry.in_state(reg.QUEUED):
            run = self._start(row)
            if run is None:
                return None  # no servers yet: queued jobs keep their order
            task = run.next_task()
            if task is not None:
                return run, task
        return None

    def _live_shards(self) -> list[str]:
        """Addresses of shards 0..S-1 (the longest run of ids from 0 that are alive)."""
        addrs = []
        while len(addrs) in self.servers:
            addrs.append(self.servers[len(addrs)].addr)
        return addrs

    def _start(self, row: dict) -> JobRun | None:
        shards = self._live_shards()
        plan = Plan.from_wire(row["plan"]) if row["plan"] else None
        if plan is not None and plan.num_shards != len(shards):
            shards = shards[:plan.num_shards] if len(shards) >= plan.num_shards else []
        if not shards:
            return None
        run = JobRun(row["id"], row["spec"], shards, plan=plan, nonlearned=row["nonlearned"] or [],
                     started_at=self.now())
        for k, step in (row["progress"] or {}).get("steps", {}).items():
            if int(k) < len(run.partitions):
                run.partitions[int(k)].step = step
        for k in (row["progress"] or {}).get("done", []):
            if k < len(run.partitions):
                run.partitions[k].done = True
        self.runs[run.job_id] = run
        self.registry.update(run.job_id, state=reg.RUNNING, started=row["started"] or time.time(), shards=shards)
        log.info("job started", extra={"job": run.job_id, "shards": len(shards), "workers": run.spec["workers"]})
        return run

    def _assignment(self, run: JobRun, worker: str, kind: str, index: int) -> dict:
        part = run.partitions[index] if index >= 0 else None
        return {
            "task": kind, "job": run.job_id, "spec": run.spec, "shards": run.shards,
            "partition": index, "partitions": len(run.partitions),
            "init": kind != EVAL and run.init_worker == worker,
            "plan": run.plan.to_wire() if run.plan else None, "nonlearned": run.nonlearned,
            "start_step": part.step if part else 0,
        }

    def _finish_runs(self) -> None:
        for run in list(self.runs.values()):
            if run.final is not None:
                self._end(run, reg.SUCCEEDED)
            elif (run.cancelled or run.error) and run.training_finished() and run.eval_worker is None:
                self._end(run, reg.CANCELLED if run.cancelled else reg.FAILED)

    def _end(self, run: JobRun, state: str) -> None:
        row = self.registry.get(run.job_id)
        wall = time.time() - (row["started"] or time.time())
        summary = run.summary()
        losses = [p.loss for p in run.partitions if p.loss is not None]
        result = {
            "test_accuracy": (run.final or {}).get("test_accuracy", run.test_accuracy),
            "test_loss": (run.final or {}).get("test_loss", run.test_loss),
            "final_loss": sum(losses) / len(losses) if losses else None,
            "steps": summary["max_step"],
            "wall_s": wall,
            "examples_per_s": summary["examples"] / wall if wall > 0 else 0.0,
            "examples": summary["examples"],
            "stopped_by": run.stopped_by or "steps",
            "target_accuracy_seen": run.target_seen,
        }
        run.sample(self.now())
        self.registry.update(run.job_id, state=state, finished=time.time(), result=result,
                             progress={**_progress_record(run), "curve": run.curve, "evals": run.history},
                             error=run.error)
        del self.runs[run.job_id]
        for k in range(len(run.shards)):
            self.acked.pop((run.job_id, k), None)
        for peer in self.workers.values():
            if peer.job == run.job_id:
                peer.job = None
        if run.spec.get("checkpoint_every"):
            for addr in run.shards:  # a last checkpoint of the final values, where shards keep them
                self.links.request(addr, Checkpoint(job=run.job_id), lambda reply: None, self.now())
        self.metrics.inc("jobs_finished_total", state=state)
        log.info("job ended", extra={"job": run.job_id, "state": state,
                                     "test_accuracy": result["test_accuracy"], "wall_s": round(wall, 2)})


def _progress_record(run: JobRun) -> dict:
    return {"steps": {str(p.index): p.step for p in run.partitions},
            "done": [p.index for p in run.partitions if p.done],
            "summary": run.summary()}

