"""The scheduler's op handlers, one method per op (the op table is in ps/scheduler.py).

Split from the loop so each file reads in one sitting. Every handler takes
(envelope, message), answers exactly once (or holds the request, for
`assign`), and raises ProtocolError for a request it refuses.
"""
from __future__ import annotations

import logging
import time

from protocol.errors import ErrorCode, ProtocolError
from protocol.jobspec import SpecError, validate_job
from protocol.plan import make_plan
from ps import registry as reg

log = logging.getLogger("pscluster.scheduler")

# Where jobs stand in a listing, for people.
_LIST_FIELDS = ("id", "name", "state", "submitted", "started", "finished", "error")


class SchedulerOps:
    """Mixed into Scheduler: the handlers of its op table."""

    # --- peers ---

    def on_register(self, envelope, msg) -> None:
        from ps.scheduler import HEARTBEAT_INTERVAL_S, Peer

        now = self.now()
        if msg.role == "server":
            if not msg.addr:
                raise ProtocolError(ErrorCode.BAD_FIELD, "a server registers with its address", rid=msg.rid)
            shard = msg.shard
            if shard < 0:  # no --shard-id: the lowest id no live server holds
                shard = next(k for k in range(len(self.servers) + 1) if k not in self.servers)
            msg = type(msg)(**{**msg.__dict__, "shard": shard})
            old = self.servers.get(msg.shard)
            if old is not None and old.addr != msg.addr:
                log.warning("shard moved", extra={"shard": msg.shard, "old": old.addr, "new": msg.addr})
            self.servers[msg.shard] = Peer("server", f"shard-{msg.shard}", now, dict(msg.info), msg.addr, msg.shard)
            log.info("server registered", extra={"shard": msg.shard, "addr": msg.addr})
            self._shard_came_back(msg.shard, msg.addr)
        elif msg.role == "worker":
            if not msg.worker:
                raise ProtocolError(ErrorCode.BAD_FIELD, "a worker registers with its worker id", rid=msg.rid)
            if msg.worker not in self.workers:
                self.workers[msg.worker] = Peer("worker", msg.worker, now, dict(msg.info))
                log.info("worker registered", extra={"worker": msg.worker, **{k: str(v) for k, v in msg.info.items()}})
            self.workers[msg.worker].last_seen = now
        else:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"role must be server or worker, found {msg.role!r:.40}",
                                rid=msg.rid)
        self._ok(envelope, msg, {"heartbeat_interval_s": HEARTBEAT_INTERVAL_S,
                                 "heartbeat_timeout_s": self.heartbeat_timeout_s,
                                 "shard": msg.shard if msg.role == "server" else -1})

    def on_heartbeat(self, envelope, msg) -> None:
        now = self.now()
        if msg.role == "server":
            shard = msg.state.get("shard", -1)
            peer = self.servers.get(shard)
            if peer is None:
                self._ok(envelope, msg, {"reregister": True})
                return
            peer.last_seen, peer.state = now, dict(msg.state)
            self._ok(envelope, msg, {})
            return
        peer = self.workers.get(msg.worker)
        if peer is None:
            self._ok(envelope, msg, {"reregister": True, "stop": True})
            return
        peer.last_seen = now
        run = self.runs.get(msg.job) if msg.job else None
        if run is not None:
            run.progress(msg.worker, msg.state)
        body = {"stop": self._should_stop(msg.worker, msg.job)}
        if run is not None:
            body["shards"] = run.shards  # where the job's shards are now: a restarted one may have moved
        self._ok(envelope, msg, body)

    def _shard_came_back(self, shard: int, addr: str) -> None:
        """A (re)registered shard: running jobs follow it to `addr` and tell it their membership.

        A shard restarted from its checkpoints may listen elsewhere now, and
        knows at best the membership of its last checkpoint. Workers learn the
        new address from their heartbeat replies.
        """
        for run in self.runs.values():
            if shard >= len(run.shards):
                continue
            if run.shards[shard] != addr:
                log.warning("job follows its shard", extra={"job": run.job_id, "shard": shard, "addr": addr})
                run.shards[shard] = addr
                self.registry.update(run.job_id, shards=run.shards)
            self._send_membership(run)

    def _should_stop(self, worker: str, job: str) -> bool:
        """True when `worker` must leave `job` (ended, stopping, or no longer its assignment)."""
        if not job:
            return False
        run = self.runs.get(job)
        if run is None or run.stopping:
            return True
        return run.partition_of(worker) is None and run.eval_worker != worker

    # --- work ---

    def on_assign(self, envelope, msg) -> None:
        from ps.scheduler import ASSIGN_WAIT_MAX_S, Waiting

        if msg.worker not in self.workers:
            raise ProtocolError(ErrorCode.BAD_STATE, f"worker {msg.worker!r:.60} is not registered", rid=msg.rid)
        now = self.now()
        self.workers[msg.worker].last_seen = now
        held = self.waiting.get(msg.worker)
        if held is not None:  # a repeat (the worker's timeout): answer the new request instead
            held.envelope, held.rid = envelope, msg.rid
            return
        peer = self.workers[msg.worker]
        if peer.job in self.runs:  # it asks for work while holding some: it left that work
            run = self.runs[peer.job]
            if run.lost(msg.worker):
                self._send_membership(run)
        peer.job = None
        self.waiting[msg.worker] = Waiting(envelope, msg.rid, now + min(max(msg.wait_s, 0.0), ASSIGN_WAIT_MAX_S))
        self.schedule(now)

    def on_report(self, envelope, msg) -> None:
        run = self.runs.get(msg.job)
        if run is None:
            self._ok(envelope, msg, {"stop": True})
            return
        handler = {
            "plan": self._report_plan, "initialized": self._report_initialized, "eval": self._report_eval,
            "final": self._report_final, "done": self._report_done, "stopped": self._report_stopped,
            "failed": self._report_failed,
        }.get(msg.event)
        if handler is None:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"unknown report event {msg.event!r:.40}", rid=msg.rid)
        body = handler(run, msg) or {}
        body.setdefault("stop", self._should_stop(msg.worker, msg.job))
        self._ok(envelope, msg, body)

    def _report_plan(self, run, msg) -> dict:
        tensors = msg.state.get("tensors")
        nonlearned = msg.state.get("nonlearned", [])
        try:
            wanted = {t[0]: (tuple(t[1]), t[2]) for t in tensors}
            plan = make_plan(wanted, len(run.shards), run.spec["partition_bytes"])
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"tensors must be [name, shape, dtype] lists: {exc}",
                                rid=msg.rid) from None
        if run.plan is not None and run.plan.digest != plan.digest:
            raise ProtocolError(ErrorCode.BAD_PLAN, "this model's tensors differ from the job's plan", rid=msg.rid)
        if run.plan is None:
            run.plan, run.nonlearned = plan, list(nonlearned)
            self.registry.update(run.job_id, plan=plan.to_wire(), tensors=tensors, nonlearned=list(nonlearned))
            log.info("plan made", extra={"job": run.job_id, "slices": len(plan.slices),
                                         "shard_bytes": ",".join(map(str, plan.shard_bytes()))})
        return {"plan": run.plan.to_wire(), "shards": run.shards}

    def _report_initialized(self, run, msg) -> dict:
        run.initialized = True
        self.schedule(self.now())
        return {}

    def _report_eval(self, run, msg) -> dict:
        acc, loss = msg.state.get("test_accuracy"), msg.state.get("test_loss")
        if isinstance(acc, (int, float)):
            run.test_accuracy, run.test_loss = float(acc), loss
            run.history.append({"step": msg.state.get("step"), "test_accuracy": float(acc), "test_loss": loss,
                                "t": time.time()})
            target = run.spec.get("target_accuracy")
            if target is not None and acc >= target and not run.stopping:
                run.stopping, run.stopped_by = True, "target"
                run.target_seen = float(acc)
                self._send_membership(run)  # freeze the parameters now, not at the next heartbeat
                log.info("target accuracy reached", extra={"job": run.job_id, "test_accuracy": acc})
        return {}

    def _report_final(self, run, msg) -> dict:
        if run.eval_worker != msg.worker:
            return {"stop": True}
        target, acc = run.spec.get("target_accuracy"), msg.state.get("test_accuracy")
        if (run.stopped_by == "target" and isinstance(acc, (int, float)) and acc < target
                and not all(p.done for p in run.partitions)):
            # The target was met by parameters one worker pulled; the frozen
            # ones (a few pushes later) fall short. Train on rather than end
            # below the target: the partitions resume where they stopped.
            log.info("final evaluation below the target: training resumes",
                     extra={"job": run.job_id, "test_accuracy": acc, "target": target})
            run.stopping, run.stopped_by, run.target_seen, run.eval_worker = False, "", None, None
            self._send_membership(run)
            self.schedule(self.now())
            return {"stop": True}
        run.final = dict(msg.state)
        self._finish_runs()
        return {"stop": True}

    def _report_done(self, run, msg) -> dict:
        run.progress(msg.worker, msg.state)
        part = run.partition_of(msg.worker)
        if part is not None:
            part.done = True
            if run.lost(msg.worker):
                self._send_membership(run)
        self._leave(msg.worker)
        return {"stop": True}

    def _report_stopped(self, run, msg) -> dict:
        run.progress(msg.worker, msg.state)
        if run.lost(msg.worker):
            self._send_membership(run)
        self._leave(msg.worker)
        return {"stop": True}

    def _report_failed(self, run, msg) -> dict:
        error = str(msg.state.get("error", "a worker failed"))[:500]
        log.error("job failed", extra={"job": run.job_id, "worker": msg.worker, "why": error})
        run.error, run.stopping, run.stopped_by = error, True, "error"
        run.lost(msg.worker)
        self._send_membership(run)
        self._leave(msg.worker)
        self.registry.update(run.job_id, error=error)
        return {"stop": True}

    def _leave(self, worker: str) -> None:
        peer = self.workers.get(worker)
        if peer is not None:
            peer.job = None

    # --- users ---

    def on_submit(self, envelope, msg) -> None:
        try:
            spec = validate_job(msg.spec)
        except SpecError as exc:
            raise ProtocolError(ErrorCode.BAD_SPEC, str(exc), rid=msg.rid) from None
        job_id = self.registry.submit(spec, [], [])  # committed before we answer
        self.metrics.inc("jobs_submitted_total")
        log.info("job submitted", extra={"job": job_id, "workers": spec["workers"]})
        self._ok(envelope, msg, {"job": job_id})
        self.schedule(self.now())

    def _job_row(self, msg) -> dict:
        row = self.registry.get(msg.job) if msg.job else None
        if row is None:
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"no job {msg.job!r:.60}", rid=msg.rid)
        return row

    def on_status(self, envelope, msg) -> None:
        if not msg.job:
            self._ok(envelope, msg, self._cluster_status())
            return
        row = self._job_row(msg)
        run = self.runs.get(msg.job)
        body = {k: row[k] for k in _LIST_FIELDS}
        body.update(spec=row["spec"], result=row["result"], plan_digest=(row["plan"] or {}).get("digest"),
                    shards=row["shards"] or [])
        if run is not None:
            body["progress"] = run.summary()
            body["partitions"] = [vars(p).copy() for p in run.partitions]
            body["history"] = run.history[-50:]
            body["curve"] = run.curve
            body["shard_stats"] = self._shard_stats(msg.job)
        else:
            saved = row["progress"] or {}
            body["progress"] = saved.get("summary", {})
            body["partitions"] = []
            body["history"] = saved.get("evals", [])[-50:]
            body["curve"] = saved.get("curve", [])
            body["shard_stats"] = self._shard_stats(msg.job)
        self._ok(envelope, msg, body)

    def _shard_stats(self, job: str) -> list[dict]:
        out = []
        for shard, peer in sorted(self.servers.items()):
            stats = (peer.state.get("jobs") or {}).get(job)
            if stats is not None:
                out.append({"shard": shard, "addr": peer.addr, **stats})
        return out

    def _cluster_status(self) -> dict:
        now = self.now()
        return {
            "servers": [{"shard": k, "addr": p.addr, "seen_s_ago": round(now - p.last_seen, 2)}
                        for k, p in sorted(self.servers.items())],
            "workers": [{"worker": w, "job": p.job, "waiting": w in self.waiting,
                         "seen_s_ago": round(now - p.last_seen, 2), **{k: str(v) for k, v in p.info.items()}}
                        for w, p in sorted(self.workers.items())],
            "running": sorted(self.runs),
            "queued": [r["id"] for r in self.registry.in_state(reg.QUEUED)],
        }

    def on_list(self, envelope, msg) -> None:
        jobs = []
        for row in self.registry.all():
            item = {k: row[k] for k in _LIST_FIELDS}
            run = self.runs.get(row["id"])
            item["progress"] = run.summary() if run else (row["progress"] or {}).get("summary", {})
            item["result"] = row["result"]
            jobs.append(item)
        self._ok(envelope, msg, {"jobs": jobs})

    def on_cancel(self, envelope, msg) -> None:
        row = self._job_row(msg)
        if row["state"] in reg.FINAL_STATES:
            raise ProtocolError(ErrorCode.BAD_STATE, f"job {msg.job} already {row['state']}", rid=msg.rid)
        self.registry.update(msg.job, state=reg.CANCELLED, finished=time.time())
        run = self.runs.get(msg.job)
        if run is not None:
            run.stopping = run.cancelled = True
            run.stopped_by = "cancel"
            self._send_membership(run)  # the shards refuse further pushes at once
            # Keep the run until its workers have left, so they are told to stop.
        log.info("job cancelled", extra={"job": msg.job})
        self._ok(envelope, msg, {"job": msg.job, "state": reg.CANCELLED})

    def on_export(self, envelope, msg) -> None:
        row = self._job_row(msg)
        if not row["plan"]:
            raise ProtocolError(ErrorCode.BAD_STATE, f"job {msg.job} has no parameters yet (state {row['state']})",
                                rid=msg.rid)
        self._ok(envelope, msg, {"job": msg.job, "state": row["state"], "plan": row["plan"],
                                 "shards": row["shards"], "nonlearned": row["nonlearned"], "result": row["result"]})

    def on_stats(self, envelope, msg) -> None:
        self._ok(envelope, msg, {"workers": len(self.workers), "servers": len(self.servers),
                                 "running": len(self.runs), "rejected_total": int(sum(
                                     self.metrics.get("rejected_total", code=c.value) for c in ErrorCode))})

    def on_shutdown(self, envelope, msg) -> None:
        self._ok(envelope, msg, {})
        self.stopping = True
