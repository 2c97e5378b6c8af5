"""Coordinated checkpoints and job-wide rollback: a mixin of SchedulerState (pure state).

Shards write a job's checkpoint each time its version crosses a multiple of
`checkpoint_every` (ps/shard.py, in the background) and list the complete,
valid versions they hold in every heartbeat. A checkpoint of the job exists
once every shard of the job lists its version: the scheduler records it
then (`JobRun.checkpoints`, with the time), and only such a version is ever
rolled back to.

The cut. Under BSP a version is a barrier: version v on every shard is the
model after steps 0..v-1 of every partition, the same cut everywhere. Under
ASP and SSP every push of a step goes to every shard, so version v on each
shard is the model after v applied pushes; the shards may have applied them
in other orders, so each shard's clock table (saved with it) says which
steps it holds. After a rollback every partition resumes from the least
step any shard holds for it; a shard that already applied a replayed step
answers it as a duplicate (ps/policy.py), so every step lands exactly once
on every shard.

Rollback. A server that registers with a running job's table restored from
disk (its registration's `restored`) is a new process: the other shards are
ahead of it. The job stops training (every partition is taken back, so the
shards refuse the holders' pushes from the next membership on and the
workers leave), every shard is told to `restore` the newest complete
checkpoint, and once all of them did, every partition goes back to its step
there and is handed out again. A refused restore (that version is bad on
some shard) tries the next older complete checkpoint; none left fails the
job. `psctl status` and `psctl logs` show each rollback with its time and
the steps lost.
"""
from __future__ import annotations

import logging

from protocol.messages import Ok, Reshard, Restore
from protocol.plan import make_plan
from ps.sched import checks
from ps.sched.events import CallShard
from ps.sched.jobs import JobRun

log = logging.getLogger("pscluster.scheduler")

# Complete checkpoints remembered per job (the shards keep fewer: ps/checkpoint.py).
MAX_CHECKPOINTS_KEPT = 64


class Checkpoints:
    """Mixin of SchedulerState: checkpoint manifests and rollbacks."""

    def _shard_checkpoints(self, peer, state: dict, out: list) -> None:
        """A server heartbeat's checkpoint lists; a version every shard of a job lists is complete,
        and is written to the job store at once (the manifest a restart rolls back to)."""
        peer.checkpoints = checks.shard_checkpoints(state)
        for run in self.runs.values():
            if peer.shard >= len(run.shards) or run.shards[peer.shard] != peer.addr:
                continue
            lists = [self._listed(run, k) for k in range(len(run.shards))]
            if any(v is None for v in lists):
                continue
            complete = {v for v in set(lists[0]).intersection(*lists[1:]) if v > run.layout_from}
            known = {c["version"] for c in run.checkpoints}
            new = sorted(v for v in complete if v not in known and v > max(known, default=-1))
            for version in new:
                run.checkpoints.append({"version": version, "at": self._wall(self._now)})
                self._note(run.job_id, "checkpoint", f"checkpoint at version {version} complete on "
                           f"{len(run.shards)} shard(s)", level=logging.DEBUG, version=version)
            del run.checkpoints[:-MAX_CHECKPOINTS_KEPT]
            if new:
                self._persist(out, run.record, progress=run.progress_record(self._now))

    def _listed(self, run: JobRun, k: int) -> list[int] | None:
        peer = self.servers.get(k)
        if peer is None or peer.addr != run.shards[k]:
            return None
        return peer.checkpoints.get(run.job_id, [])

    def _shard_restarted(self, shard: int, instance: str, restored: dict[str, int], out: list) -> None:
        """A server registered as `shard`: for each running job on it, a new process that restored
        the job's table from disk rolls the whole job back to its newest complete checkpoint."""
        for run in self.runs.values():
            if shard >= len(run.shards):
                continue
            before = run.instances.get(shard)
            if before is None:
                run.instances[shard] = instance
            # Only a registration that says it restored the job counts: a server started without
            # --shard-id registers once to claim its id, then again after it restored.
            if run.job_id not in restored or before in (None, "", instance) or run.stopping or run.final is not None:
                continue
            run.instances[shard] = instance
            self._note(run.job_id, "shard_restored", f"shard {shard} restarted and restored version "
                       f"{restored[run.job_id]} from its checkpoint: the job rolls back",
                       level=logging.WARNING, shard=shard, version=restored[run.job_id])
            self._begin_rollback(run, shard, restored[run.job_id], out)

    def _shards_at_start(self, run: JobRun, out: list) -> None:
        """A job (re)starting, after a scheduler restart or `psctl resume`: a shard process other than
        the one that last held its table restored it from disk, or lost it, so the job goes back to
        its newest complete checkpoint first."""
        changed = []
        for k in range(len(run.shards)):
            now = self.servers[k].info.get("instance", "") if k in self.servers else ""
            if run.instances.get(k) not in (None, "", now):
                changed.append(k)
            run.instances[k] = now
        if changed and run.checkpoints and run.spec.get("checkpoint_every"):
            self._note(run.job_id, "shard_restored", f"shard {changed[0]} restarted since the job last ran: it "
                       "rolls back to its newest complete checkpoint", level=logging.WARNING, shard=changed[0])
            self._begin_rollback(run, changed[0], run.checkpoints[-1]["version"], out)

    def _needs_checkpoint_start(self, record) -> bool:
        """Not one of the server processes that held the job's tables is still there: they come back from
        its checkpoints, so the job waits for the shards to stop changing (a cluster coming up)."""
        saved = (record.progress or {}).get("instances")
        if not (record.plan and record.spec.get("checkpoint_every") and isinstance(saved, dict) and saved
                and (record.progress or {}).get("checkpoints")):
            return False
        for k, instance in saved.items():
            peer = self.servers.get(int(k)) if str(k).isdigit() else None
            if peer is not None and instance and peer.info.get("instance", "") == instance:
                return False
        return True

    def _begin_reshard(self, run: JobRun, out: list) -> None:
        """The job (every shard process new) starts on more shards than its plan has: a new plan, and
        every shard cuts its slices out of the old shards' newest complete checkpoint (ps/reshard.py)."""
        old = run.plan
        run.plan = make_plan({t.name: (t.shape, t.dtype) for t in old.tensors}, len(run.shards),
                             run.spec["partition_bytes"])
        newest = run.checkpoints[-1]["version"]
        older = [c["version"] for c in run.checkpoints[:-1]]
        for k in range(len(run.shards)):
            run.instances[k] = self.servers[k].info.get("instance", "")
        run.checkpoints = []
        self._persist(out, run.record, plan=run.plan.to_wire(), shards=list(run.shards))
        self._note(run.job_id, "reshard", f"every shard of the job restarted: its {old.num_shards} shards' "
                   f"checkpoint at version {newest} is cut onto {len(run.shards)} shards",
                   level=logging.WARNING, version=newest, shards=len(run.shards))
        run.rollback = {"shard": -1, "version": newest, "acked": {}, "older": older,
                        "old_plan": old.to_wire(), "from": old.num_shards}
        self._send_restores(run, out)

    def _begin_rollback(self, run: JobRun, shard: int, newest: int, out: list) -> None:
        candidates = [c["version"] for c in run.checkpoints if c["version"] <= newest]
        if not candidates:
            self._fail(run, f"shard {shard} lost the job's parameters and the job has no complete checkpoint "
                       "to roll back to")
            return
        if run.rollback is None:
            # Take every partition back: the next membership has no holders, so the shards refuse
            # the old holders' pushes, and the workers leave (their view says stop).
            held = [p.index for p in run.partitions if p.holder is not None]
            if held:
                run.ungrant(held)
            run.joining.clear()
        run.rollback = {"shard": shard, "version": candidates[-1], "acked": {}, "older": candidates[:-1]}
        # The membership that takes the partitions back goes out first: a shard handles its
        # calls in order, so no push lands between its restore and that membership.
        self._flush_memberships(out)
        self._send_restores(run, out)

    def _send_restores(self, run: JobRun, out: list, only: int | None = None) -> None:
        rb = run.rollback
        version = rb["version"]
        if only is None:
            rb["acked"] = {}
        for k, addr in enumerate(run.shards):
            if only is not None and k != only:
                continue
            call = next(self._call_ids)
            self.calls[call] = ("restore", run.job_id, k, version)
            msg = (Reshard(job=run.job_id, version=version, plan=run.plan.to_wire(), old_plan=rb["old_plan"])
                   if "old_plan" in rb else Restore(job=run.job_id, version=version))
            out.append(CallShard(call, addr, msg, key=self._shard_key(k, addr)))

    def _restored(self, run: JobRun, k: int, version: int, reply, out: list) -> None:
        """One shard's answer to `restore`."""
        rb = run.rollback
        if rb is None or rb["version"] != version:
            return  # an answer to an earlier try
        if reply is None:  # unanswered after the tries (a big checkpoint loads slowly): ask that shard again
            self._send_restores(run, out, only=k)
            return
        if not isinstance(reply, Ok):
            why = getattr(reply, "message", "no answer")
            older = rb["older"]
            self._note(run.job_id, "restore_refused", f"shard {k} could not restore version {version}: {why}"
                       + (f"; trying version {older[-1]}" if older else ""), level=logging.WARNING, shard=k)
            if not older:
                run.rollback = None
                self._fail(run, f"no complete checkpoint could be restored on every shard (last: shard {k}: {why})")
                return
            rb["version"] = older.pop()
            self._send_restores(run, out)
            return
        rb["acked"][k] = checks.part_clocks(reply.body.get("clocks"), len(run.partitions))
        if len(rb["acked"]) < len(run.shards):
            return
        # Every shard holds the cut: each partition resumes from the least step any shard holds.
        steps: dict[int, int] = {}
        for clocks in rb["acked"].values():
            for index, step in clocks.items():
                steps[index] = min(step, steps.get(index, step))
        if not steps:  # a shard that does not say: under BSP the version is every partition's step
            steps = {p.index: version for p in run.partitions}
        lost = run.roll_back(steps)
        run.rollback = None
        done = {"at": self._wall(self._now), "shard": rb["shard"], "version": version, "steps_lost": lost}
        if "old_plan" in rb:
            done["shards"] = [rb["from"], len(run.shards)]
            run.layout_from = version   # older files are the old layout's: never a rollback target
        run.rollbacks.append(done)
        onto = f" onto {len(run.shards)} shards (from {rb['from']})" if "old_plan" in rb else ""
        self._note(run.job_id, "rolled_back", f"rolled back to the checkpoint at version {version}{onto}: "
                   f"{lost:,} steps lost, training resumes", level=logging.WARNING, version=version,
                   steps_lost=lost)
        self._persist(out, run.record, progress=run.progress_record(self._now))
