"""What users ask the scheduler: status, list, cancel, export, stats, shutdown.

Bodies are built from the job records and the running jobs' partitions,
so every figure (steps, examples, examples/s, holders) is what happened.
"""
from __future__ import annotations

import logging

from protocol.errors import ErrorCode, ProtocolError
from protocol.jobstate import FINAL_STATES
from ps.sched.events import ReadNotes, Stop
from ps.sched.jobs import CANCELLED, FAILED, QUEUED, JobRecord

log = logging.getLogger("pscluster.scheduler")

# Fields of a job shown in lists and status.
LIST_FIELDS = ("id", "name", "state", "submitted", "started", "finished", "error")
# Evaluations and curve points a status answer carries at most.
STATUS_HISTORY = 50
# Events one `logs` answer carries at most (a follower asks again from `next`).
LOGS_PAGE = 500


class Views:
    """Mixin of SchedulerState: the users' ops."""

    def _record(self, msg) -> JobRecord:
        record = self.jobs.get(msg.job) if msg.job else None
        if record is None:
            raise ProtocolError(ErrorCode.UNKNOWN_JOB, f"no job {msg.job!r:.60}", rid=msg.rid)
        return record

    def on_status(self, req, out: list) -> None:
        msg = req.msg
        if not msg.job:
            self._ok(out, req, self._cluster_status(req.now))
            return
        record = self._record(msg)
        run = self.runs.get(record.id)
        body = {k: getattr(record, k) for k in LIST_FIELDS}
        body.update(spec=record.spec, result=record.result, shards=list(record.shards),
                    plan_digest=(record.plan or {}).get("digest"))
        if run is not None:
            saved = run.progress_record(req.now)
            body["error"] = body["error"] or run.error
        else:
            saved = record.progress or {}
        body["progress"] = saved.get("summary", {})
        body["partitions"] = saved.get("partitions", [])
        body["history"] = saved.get("evals", [])[-STATUS_HISTORY:]
        body["curve"] = saved.get("curve", [])
        body["rollbacks"] = saved.get("rollbacks", [])
        body["checkpoints"] = saved.get("checkpoints", [])[-STATUS_HISTORY:]
        body["shard_stats"] = self._shard_stats(record.id)
        self._ok(out, req, body)

    def on_logs(self, req, out: list) -> None:
        """A page of a job's events; they live in the job store, so the daemon reads and answers."""
        msg = req.msg
        record = self._record(msg)
        if not (0 <= msg.after < 1 << 62 and 0 <= msg.limit < 1 << 62):
            raise ProtocolError(ErrorCode.BAD_FIELD, "after and limit must be in 0..2**62", rid=msg.rid)
        out.append(ReadNotes(req.peer, msg.rid, record.id, msg.after, min(msg.limit or LOGS_PAGE, LOGS_PAGE),
                             record.state))

    def _shard_stats(self, job: str) -> list[dict]:
        out = []
        for shard, peer in sorted(self.servers.items()):
            stats = peer.stats.get(job)
            if stats is not None:
                out.append({"shard": shard, "addr": peer.addr, **stats})
        return out

    def _cluster_status(self, now: float) -> dict:
        return {
            "servers": [{"shard": k, "addr": p.addr, "seen_s_ago": round(now - p.last_seen, 2)}
                        for k, p in sorted(self.servers.items())],
            "workers": [{**p.info, "worker": w, "job": p.job, "waiting": p.waiting is not None,
                         "partitions": self.runs[p.job].held_by(w) if p.job in self.runs else [],
                         "seen_s_ago": round(now - p.last_seen, 2)}   # after `info`: a peer cannot forge them
                        for w, p in sorted(self.workers.items())],
            "running": list(self.runs),
            "queued": [r.id for r in self._queued()],
        }

    def on_list(self, req, out: list) -> None:
        jobs = []
        for record in sorted(self.jobs.values(), key=lambda r: -r.seq):
            item = {k: getattr(record, k) for k in LIST_FIELDS}
            run = self.runs.get(record.id)
            item["progress"] = run.summary(req.now) if run else (record.progress or {}).get("summary", {})
            item["result"] = {k: v for k, v in (record.result or {}).items() if k != "partitions"}
            jobs.append(item)
        self._ok(out, req, {"jobs": jobs})

    def on_cancel(self, req, out: list) -> None:
        record = self._record(req.msg)
        if record.state in FINAL_STATES:
            raise ProtocolError(ErrorCode.BAD_STATE, f"job {record.id} already {record.state}", rid=req.msg.rid)
        run = self.runs.get(record.id)
        if run is not None:
            run.stopping = run.cancelled = True
            run.stopped_by = "cancel"
            run.epoch += 1  # an empty membership: the shards refuse further pushes at once
            # The run stays until its workers have left, so they are told to stop.
        self._persist(out, record, state=CANCELLED, finished=self._wall(req.now))
        self._note(record.id, "cancelled", "cancelled" + (" while queued" if run is None else ": its workers stop"),
                   level=logging.INFO)
        self._ok(out, req, {"job": record.id, "state": CANCELLED})

    def on_resume(self, req, out: list) -> None:
        """A failed or cancelled job runs again: queued, its partitions' steps kept, started the way a
        restarted scheduler starts the jobs it was running (ps/sched/placement.py); a shard that
        restarted meanwhile rolls it back to its newest complete checkpoint (ps/sched/checkpoints.py)."""
        record = self._record(req.msg)
        if record.state not in (FAILED, CANCELLED):
            raise ProtocolError(ErrorCode.BAD_STATE, f"job {record.id} is {record.state}: only a failed or "
                                "cancelled job resumes", rid=req.msg.rid)
        if record.id in self.runs:
            raise ProtocolError(ErrorCode.BAD_STATE, f"job {record.id} is still stopping (its workers are leaving): "
                                "try again in a few seconds", rid=req.msg.rid)
        if not record.plan:
            raise ProtocolError(ErrorCode.BAD_STATE, f"job {record.id} never created its parameters: submit it "
                                "again instead", rid=req.msg.rid)
        was = record.state
        self._persist(out, record, state=QUEUED, finished=None, result={}, error="")
        self._note(record.id, "resumed", f"resumed (it was {was}): it runs again from where its partitions stood",
                   was=was)
        self._ok(out, req, {"job": record.id, "state": QUEUED})

    def on_export(self, req, out: list) -> None:
        record = self._record(req.msg)
        if not record.plan:
            raise ProtocolError(ErrorCode.BAD_STATE, f"job {record.id} has no parameters yet (state {record.state})",
                                rid=req.msg.rid)
        self._ok(out, req, {"job": record.id, "state": record.state, "plan": record.plan, "spec": record.spec,
                            "shards": list(record.shards), "nonlearned": list(record.nonlearned),
                            "shard_keys": [self._shard_key(k, addr) for k, addr in enumerate(record.shards)],
                            "result": record.result})

    def on_stats(self, req, out: list) -> None:
        self._ok(out, req, {"workers": len(self.workers), "servers": len(self.servers), "running": len(self.runs),
                            "rejected_total": int(sum(self.metrics.get("rejected_total", code=c.value)
                                                      for c in ErrorCode))})

    def on_shutdown(self, req, out: list) -> None:
        self._ok(out, req, {})
        out.append(Stop())
