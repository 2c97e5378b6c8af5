"""Who does what: handing partitions to workers, starting jobs, final evaluations.

Runs after every event (`_place`). The rules, oldest running job first:

- A job whose tables do not exist yet gets one initialising worker, which
  holds every partition; up to one more free worker per partition waits
  beside it (`joining`) for the tables.
- A partition without a holder (its worker died, failed or gave it back)
  goes to a waiting joiner, else to the live holder with the fewest
  partitions: a partition is never left behind while the job has a live
  worker, so a BSP barrier never waits on a dead one.
- A free worker joins a running job that has more partitions with steps
  left than holders; the most loaded holders are asked to give partitions
  back (`release`) at their next step boundary, and the joiner gets them.
- A job whose partitions are all done gets one worker for its final
  evaluation; then queued jobs start, in submission order, while free
  workers and enough live shards are there.

The mixin reads and writes the state of `SchedulerState` (ps/sched/state.py).
"""
from __future__ import annotations

import logging
import math

from protocol.plan import Plan
from ps.sched.jobs import QUEUED, RUNNING, JobRun

log = logging.getLogger("pscluster.scheduler")


class Placement:
    """Mixin of SchedulerState: placement after every event."""

    def _place(self, now: float, out: list) -> None:
        free = [w for w in self.workers.values() if w.waiting is not None and w.job is None]
        for run in list(self.runs.values()):
            free = self._place_run(run, free)
        for record in self._queued():
            if not free:
                break
            run = self._start(record, now, out)
            if run is None:
                break  # no shards yet: queued jobs keep their order
            free = self._place_run(run, free)

    def _place_run(self, run: JobRun, free: list) -> list:
        if run.rollback is not None:
            return free  # nothing is handed out until every shard holds the checkpoint (ps/sched/checkpoints.py)
        if run.stopping:
            if (run.stopped_by == "target" and run.training_finished() and run.final is None
                    and run.eval_worker is None and free):
                self._give_eval(run, free.pop(0))
            return free
        active = run.active()
        if not active:
            if run.initialized and run.final is None and run.eval_worker is None and free:
                self._give_eval(run, free.pop(0))
            return free
        if not run.initialized:
            if run.init_worker is None:
                # A worker already waiting beside the job first (its last initialiser died or failed).
                joiner = next((self.workers[w] for w in sorted(run.joining) if w in self.workers), None)
                worker = joiner or (free.pop(0) if free else None)
                if worker is not None:
                    run.joining.discard(worker.id)
                    run.init_worker, worker.job = worker.id, run.job_id
                    run.grant(worker.id, [p.index for p in active if p.holder is None])
                    self._note(run.job_id, "initialising", f"{worker.id} initialises the parameters",
                               worker=worker.id)
            return self._reserve(run, active, free)
        free = self._reserve(run, active, free)
        holders = run.holders()
        targets = holders + sorted(w for w in run.joining if w not in holders)
        load = {t: len(run.held_by(t)) for t in targets}
        grants: dict[str, list[int]] = {}
        for p in active:
            if p.holder is None and targets:
                # Joiners first, then the least loaded holder.
                target = min(targets, key=lambda t: (t not in run.joining or load[t] > 0, load[t]))
                load[target] += 1
                grants.setdefault(target, []).append(p.index)
        for worker, indices in grants.items():
            run.grant(worker, indices)
            log.info("partitions granted", extra={"job": run.job_id, "worker": worker,
                                                  "partitions": ",".join(map(str, indices))})
        self._ask_releases(run, active, load)
        return free

    def _reserve(self, run: JobRun, active: list, free: list) -> list:
        """Free workers join while the job has more partitions with steps left than hands."""
        slots = len(active) - len(run.holders()) - len(run.joining)
        while slots > 0 and free:
            worker = free.pop(0)
            worker.job = run.job_id
            run.joining.add(worker.id)
            slots -= 1
        return free

    def _ask_releases(self, run: JobRun, active: list, load: dict[str, int]) -> None:
        """Mark partitions the most loaded holders should give back to empty-handed joiners."""
        for p in run.partitions:
            p.release = False
        need = sum(1 for w in run.joining if load.get(w, 0) == 0)
        if not need or not load:
            return
        quota = math.ceil(len(active) / len(load))
        for holder in sorted(run.holders(), key=lambda h: -load[h]):
            mine = sorted(run.held_by(holder), reverse=True)  # keep the lowest: partition 0 evaluates
            excess = load[holder] - quota
            while need > 0 and excess > 0 and mine:
                run.partitions[mine.pop(0)].release = True
                excess -= 1
                need -= 1

    def _give_eval(self, run: JobRun, worker) -> None:
        run.eval_worker, worker.job = worker.id, run.job_id
        run.epoch += 1   # the shards learn it may read (readers); it is told once they know
        run.grants[worker.id] = run.epoch
        self._note(run.job_id, "evaluating", f"{worker.id} runs the final evaluation", worker=worker.id)

    def _queued(self) -> list:
        return [r for r in self.jobs.values() if r.state == QUEUED]

    def _live_shards(self) -> list[str]:
        """Addresses of shards 0..S-1 (the longest run of ids from 0 that are alive)."""
        addrs = []
        while len(addrs) in self.servers:
            addrs.append(self.servers[len(addrs)].addr)
        return addrs

    def _start(self, record, now: float, out: list) -> JobRun | None:
        shards = self._live_shards()
        reshard = False
        if record.plan:
            count = Plan.from_wire(record.plan).num_shards
            if self._needs_checkpoint_start(record):
                if now - self.shards_changed_at < self.heartbeat_timeout_s / 2:
                    return None  # its shards are coming back: start once the set stops changing
                reshard = len(shards) > count   # more shards now: cut it onto all of them
            if not reshard:
                shards = shards[:count] if len(shards) >= count else []
        if not shards:
            return None
        # A job a previous scheduler started keeps its start: wall_s counts from then.
        started_at = now - max(0.0, self._wall(now) - record.started) if record.started else now
        # Epochs only grow on a shard: a resumed job (same scheduler) starts above its last one.
        summary = (record.progress or {}).get("summary")
        last = summary.get("epoch") if isinstance(summary, dict) else None
        known = isinstance(last, int) and not isinstance(last, bool)
        base = max(self.epoch_base, last + 1) if known else self.epoch_base
        run = JobRun(record, shards, epoch_base=base, now=now, started_at=started_at)
        if reshard:
            self._begin_reshard(run, out)
        else:
            self._shards_at_start(run, out)  # a shard restarted since the job last ran: back to a checkpoint
        self.runs[run.job_id] = run
        # progress: which server processes hold its tables (a later start compares them)
        self._persist(out, record, state=RUNNING, started=record.started or self._wall(now), shards=list(run.shards),
                      progress=run.progress_record(now))
        self._note(run.job_id, "started", f"started on {len(shards)} shard(s): {', '.join(shards)}",
                   shards=len(shards), partitions=len(run.partitions))
        return run
