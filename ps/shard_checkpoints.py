"""A shard's checkpoints, on its loop: the cut, the ops, restores, what heartbeats list.

Mixed into Shard (ps/shard.py). The files are ps/checkpoint.py's; the
writing happens on the writer thread (ps/checkpoint_writer.py); this is the
loop's side: when to take a snapshot, which request waits for which write,
and what a finished task changes.

- At start, each job found on disk is restored from its newest checkpoint
  that passes every check (the ones passed over are logged with the
  reason); a job whose every file is bad is not restored, and the log says
  so. The older files are then verified in the background, and the
  versions that pass are listed in heartbeats (`checkpoints`).
- A job's checkpoint is cut when its version crosses a multiple of
  `checkpoint_every` (and no BSP step is half-summed): a snapshot is taken
  on the loop and written by the thread. A write deletes all but the
  newest three files, except the newest version listed by each of the last
  two heartbeats: the scheduler rolls back only to versions it heard of.
- `checkpoint` answers once the write it asked for is on disk (fsync'd and
  renamed): it is the scheduler's last checkpoint of a finished job, so an
  acknowledged one must survive a crash right after. The answer comes from
  the loop when the writer reports the write; the loop never waits for it.
- `restore` reloads a complete, valid checkpoint of a job (read and checked
  on the writer thread), then replaces the table at once on the loop;
  parked pulls of the job are refused with `reassigned` so their workers
  ask the scheduler where they stand, and the job's membership (newer than
  the checkpoint's) is applied again.
"""
from __future__ import annotations

import logging

from protocol.codec import encode
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import Ok
from ps import checkpoint
from ps.checkpoint_writer import BARRIER, LOAD, REMOVE, VERIFY, WRITE, CheckpointWriter, Task, take_snapshot

log = logging.getLogger("pscluster.server")

# Longest a stopping shard waits for its writer to finish the writes it has
# queued: within Kubernetes' default 30 s grace period, with time left for
# the rest of the shutdown. A write still running then is abandoned (its
# temporary file is never loaded, and is removed at the next start).
WRITER_CLOSE_TIMEOUT_S = 20.0


class ShardCheckpoints:
    """Mixin of Shard: checkpoint writing, restoring and listing (needs `checkpoint_dir`)."""

    def _init_checkpoints(self) -> None:
        self.writer: CheckpointWriter | None = None
        self.ckpt_versions: dict[str, list[int]] = {}   # job -> complete, valid versions on disk, ascending
        self.ckpt_figures: dict[str, dict] = {}         # job -> its writes' figures (stats)
        self.restored: dict[str, int] = {}              # job -> the version restored from disk at start
        self.restoring: dict[str, Task] = {}            # job -> its `restore` in progress
        self._writes: dict[str, Task] = {}              # job -> its newest write not yet taken done
        # job -> the newest version of each of the last two heartbeats: the scheduler rolls a job back
        # only to a version it heard of, and may not have heard the latest beat yet, so those stay on
        # disk even when checkpoints come faster than beats. Replaced whole, never changed in place:
        # the writer thread reads it.
        self._announced: dict[str, tuple] = {}

    # --- start and stop ---

    def _start_checkpoints(self) -> None:
        """Restore every job found on disk and start the writer (called once, before serving)."""
        self.writer = CheckpointWriter(self.checkpoint_dir, self.shard_id, protect=self._protected)
        self._restore_all()
        self.writer.start()

    def _close_checkpoints(self) -> None:
        if self.writer is not None and not self.writer.close(WRITER_CLOSE_TIMEOUT_S):
            log.warning("a checkpoint write was still running at shutdown; it is abandoned",
                        extra={"shard": self.shard_id, "waited_s": WRITER_CLOSE_TIMEOUT_S})

    def _restore_all(self) -> None:
        root = self.checkpoint_dir
        for job in checkpoint.jobs_on_disk(root, self.shard_id):
            directory = checkpoint.job_dir(root, job, self.shard_id)
            checkpoint.remove_temporaries(directory)
            on_disk = checkpoint.versions(directory)
            try:
                loaded = checkpoint.load_newest_valid(directory, job=job, shard_id=self.shard_id)
                table = checkpoint.build_table(loaded, self.shard_id) if loaded is not None else None
            except Exception as exc:  # (MemoryError, a bug) must not stop the shard serving its other jobs
                log.error("job not restored", extra={"job": job, "dir": str(directory), "why": repr(exc)})
                continue
            if table is None:
                log.error("job not restored: none of its checkpoints passed the checks",
                          extra={"job": job, "dir": str(directory), "files": len(on_disk)})
                continue
            self.tables[job] = table
            if self.link is not None:
                self._announced[job] = tuple(on_disk)  # what the last process may have announced
            self.restored[job] = table.version
            self.ckpt_versions[job] = [table.version]
            log.info("restored", extra={"job": job, "version": table.version, "path": str(loaded.path),
                                        "skipped": sum(v > table.version for v in on_disk)})
            older = [v for v in on_disk if v < table.version][-(checkpoint.KEEP_CHECKPOINTS - 1):]
            for version in older:  # listed once checked, off the loop
                self.writer.submit(Task(VERIFY, job, version, plan=table.plan))

    # --- the cut ---

    def _maybe_checkpoint(self, table) -> None:
        every = table.checkpoint_every
        if self.writer is None or not every or table.pending_sums() or table.job in self.restoring:
            return
        if table.version // every > table.last_checkpoint_version // every:
            self._snapshot(table)

    def _snapshot(self, table, waiter=None) -> Task:
        snap, pin = take_snapshot(table)
        table.last_checkpoint_version = table.version
        task = self._writes[table.job] = self.writer.write(snap, pin, waiter)
        return task

    # --- ops ---

    def on_checkpoint(self, envelope: list, msg) -> None:
        if self.writer is None:
            raise ProtocolError(ErrorCode.BAD_STATE, "this shard runs without --checkpoint-dir", rid=msg.rid)
        tables = [self._table(msg)] if msg.job else [t for t in self.tables.values() if t.loaded]
        busy = [t.job for t in tables if t.job in self.restoring]
        if busy:
            raise ProtocolError(ErrorCode.BAD_STATE, f"job {busy[0]!r} is being restored on shard {self.shard_id}",
                                rid=msg.rid)
        written: dict[str, str] = {}
        failed: dict[str, str] = {}
        left = {t.job for t in tables}

        def done(task: Task) -> None:
            if task.error:
                failed[task.job] = task.error
            else:
                written[task.job] = str(task.written.path)
            left.discard(task.job)
            if left:
                return
            if failed:
                job, why = next(iter(failed.items()))
                self._reject(envelope, ProtocolError(ErrorCode.BAD_STATE, f"checkpoint of job {job!r} not written "
                                                     f"on shard {self.shard_id}: {why}", rid=msg.rid), job=job)
            else:
                self._send(envelope, encode(Ok(rid=msg.rid, job=msg.job, body={"written": written})))

        if not tables:
            self._send(envelope, encode(Ok(rid=msg.rid, job=msg.job, body={"written": {}})))
        for table in tables:
            pending = self._writes.get(table.job)
            if pending is not None and pending.version == table.version:
                pending.waiters.append(done)  # already being written as it is now (a retry, a cut just taken)
            else:
                self._snapshot(table, done)

    def on_restore(self, envelope: list, msg) -> None:
        if self.writer is None:
            raise ProtocolError(ErrorCode.BAD_STATE, "this shard runs without --checkpoint-dir", rid=msg.rid)
        table = self._table(msg, loaded=False)
        if msg.version < 0:
            raise ProtocolError(ErrorCode.BAD_FIELD, f"version must be >= 0, found {msg.version}", rid=msg.rid)

        def answer(task: Task) -> None:
            if task.error:
                self._reject(envelope, ProtocolError(ErrorCode.BAD_STATE, task.error, rid=msg.rid), job=msg.job)
            else:
                new = task.table
                self._send(envelope, encode(Ok(rid=msg.rid, job=msg.job, body={
                    "job": msg.job, "version": new.version, "clocks": dict(new.policy.clocks)})))

        pending = self.restoring.get(msg.job)
        if pending is not None:
            if pending.version != msg.version:
                raise ProtocolError(ErrorCode.BAD_STATE, f"job {msg.job!r} is being restored to version "
                                    f"{pending.version} on shard {self.shard_id}", rid=msg.rid)
            pending.waiters.append(answer)  # the same request again (a retry): one reload answers both
            return
        self.restoring[msg.job] = self.writer.submit(Task(LOAD, msg.job, msg.version, plan=table.plan,
                                                          target=table, waiters=[answer]))
        log.info("restore asked", extra={"job": msg.job, "version": msg.version})

    def _remove_checkpoints(self, job: str, reply) -> None:
        """Delete a dropped job's files after whatever the writer still does for it; then `reply()`."""
        self.ckpt_versions.pop(job, None)
        self.ckpt_figures.pop(job, None)
        self.restored.pop(job, None)
        self._announced.pop(job, None)
        self.writer.submit(Task(REMOVE, job, waiters=[lambda _task: reply()]))

    def _after_checkpoint_work(self, reply) -> None:
        """`reply()` once every checkpoint task asked so far is done (at once when there is none)."""
        if self.writer is None or self.writer.idle():
            reply()
        else:
            self.writer.submit(Task(BARRIER, "", waiters=[lambda _task: reply()]))

    # --- finished work, on the loop ---

    def _on_writer(self) -> None:
        for task in self.writer.take_done():
            if task.kind == WRITE:
                self._written(task)
            elif task.kind == LOAD:
                self._reloaded(task)
            elif task.kind == VERIFY:
                if task.error:
                    log.warning("checkpoint skipped", extra={"job": task.job, "version": task.version,
                                                             "why": task.error})
                elif task.job in self.ckpt_versions:
                    self._list_version(task.job, task.version, ())
            for waiter in task.waiters:
                try:
                    waiter(task)
                except Exception:  # one bad answer must not keep the others from going out
                    log.exception("internal error answering after checkpoint work", extra={"job": task.job})

    def _written(self, task: Task) -> None:
        if self._writes.get(task.job) is task:
            del self._writes[task.job]
        if task.error:
            log.error("checkpoint not written", extra={"job": task.job, "version": task.version, "why": task.error})
            return
        w = task.written
        self.metrics.inc("checkpoints_total")
        figures = self.ckpt_figures.setdefault(task.job, {"written": 0, "write_s": 0.0, "checksum_s": 0.0})
        figures["written"] += 1
        figures["write_s"] += w.seconds
        figures["checksum_s"] += w.checksum_s
        figures["bytes"] = w.nbytes
        log.info("checkpoint written", extra={"job": task.job, "version": w.version, "path": str(w.path),
                                              "seconds": round(w.seconds, 3), "checksum_s": round(w.checksum_s, 3)})
        if task.job in self.tables:
            self._list_version(task.job, w.version, w.deleted)

    def _list_version(self, job: str, version: int, deleted) -> None:
        gone = set(deleted)
        kept = sorted({v for v in self.ckpt_versions.get(job, []) if v not in gone} | {version})
        self.ckpt_versions[job] = kept[-checkpoint.KEEP_CHECKPOINTS:]

    def _reloaded(self, task: Task) -> None:
        """A `restore`'s checkpoint was read and checked: the job's table becomes it."""
        if self.restoring.get(task.job) is task:
            del self.restoring[task.job]
        old = self.tables.get(task.job)
        if task.error:
            log.warning("restore refused", extra={"job": task.job, "version": task.version, "why": task.error})
            return
        if old is None or old is not task.target:
            task.error = f"job {task.job!r} was dropped on shard {self.shard_id} while it was being restored"
            return
        new = task.table
        new.readers, new.pushes, new.pulls = old.readers, old.pushes, old.pulls
        new.copies_on_write, new.staleness = old.copies_on_write, old.staleness
        self.tables[task.job] = new
        self.ledger.drop_job(task.job)  # pieces applied to the old values are gone with them
        why = (f"job {task.job!r} was rolled back to version {new.version} on shard {self.shard_id}: ask the "
               "scheduler for your partitions and read their steps again")
        refused = [t for t in self.parked if t[0] == task.job]
        for token in refused:
            env, req, _sids = self.parked.pop(token)
            self._reject(env, ProtocolError(ErrorCode.REASSIGNED, why, rid=req.rid), job=task.job)
        self._parked_gauge = len(self.parked)
        self.metrics.set("parked_pulls", self._parked_gauge)
        for key in [k for k in self.last_reply if k[0] == task.job]:
            del self.last_reply[key]  # replies of the history left behind
        latest = self.memberships.get(task.job)
        if latest is not None and latest.epoch > new.policy.epoch:
            # The scheduler's current membership, not the one saved with the checkpoint: holders it
            # took partitions from must stay refused.
            self._apply_membership(new, latest)
        gone = set(task.deleted)
        self.ckpt_versions[task.job] = [v for v in self.ckpt_versions.get(task.job, [])
                                        if v < new.version and v not in gone] + [new.version]
        log.warning("rolled back to a checkpoint", extra={
            "job": task.job, "version": new.version, "epoch": new.policy.epoch, "refused_pulls": len(refused),
            "deleted_newer": len(gone)})

    # --- what the scheduler and `stats` are told ---

    def _checkpoint_lists(self) -> dict:
        """job -> its complete, valid checkpoint versions (ascending), for every job held (heartbeats)."""
        lists = {job: list(self.ckpt_versions.get(job, ())) for job in self.tables}
        for job, versions in lists.items():
            if versions:
                self._announced[job] = (*self._announced.get(job, ())[-1:], versions[-1])
        return lists

    def _protected(self, job: str) -> tuple:
        return self._announced.get(job, ())

    def _checkpoint_stats(self) -> dict:
        """job -> its versions on disk, and its writes since start: how many, seconds in all, of
        them checksumming, bytes of the last (`stats`)."""
        return {job: {"versions": list(self.ckpt_versions.get(job, ())),
                      **self.ckpt_figures.get(job, {"written": 0, "write_s": 0.0, "checksum_s": 0.0})}
                for job in self.tables}
