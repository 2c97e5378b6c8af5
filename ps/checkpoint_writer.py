"""The shard's checkpoint file work, on one background thread, in the order it was asked.

Writing a checkpoint of a large table takes seconds (100M float32
parameters: 400 MB written and fsync'd); done on the shard's loop, every
worker of every job on the shard would wait that long. So the loop only
takes a snapshot at the cut (`take_snapshot`) and hands it here; one
thread writes, and tells the loop when it is done through a pipe the loop
polls beside its sockets. The thread never touches a socket or a table the
loop uses: ZeroMQ sockets are not thread-safe, and everything the loop
answers (a `checkpoint` request waiting for its write, a `restore`, a
`drop`, a `stats`) is answered by the loop when it takes the finished task
(`take_done`).

Tasks run one at a time, first asked first done, so a job's writes, its
reloads and the removal of its files never overlap or reorder. A write
asked while an older one of the same job waits behind the write in
progress is not queued again: the waiting one takes the newer snapshot
(only the newest matters), and whoever waited for the older one now waits
for the newer. A snapshot handed to an idle writer is always written.

The snapshot: the values are not copied. Replies in flight already make the
table copy a slice before updating it (copy on write, ps/table.py); the
snapshot registers a `Pin` with the same mechanism, so a slice updated
before its write is done is copied then, and one the job does not touch
meanwhile never is. The optimizer state is updated in place by the
optimizer, outside that mechanism, so it is copied at the cut (a memcpy,
several times faster than the disk), and so is the policy state (clocks,
version: small).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ps import checkpoint
from ps.checkpoint import BadCheckpoint, Snapshot

log = logging.getLogger("pscluster.server")

WRITE, LOAD, VERIFY, REMOVE, BARRIER = "write", "load", "verify", "remove", "barrier"
# The writer thread's niceness (Linux schedules threads on their own): on a
# machine whose cores are busy serving, a write takes the time the loop
# leaves, not time from the loop's steps.
WRITER_NICENESS = 10


class Pin:
    """A tracker the table's copy on write honours (JobTable.mark_inflight): while `done` is
    False, an update of a pinned slice goes to a copy and the pinned array stays as it was."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False


def take_snapshot(table) -> tuple[Snapshot, Pin]:
    """`table` as of now, safe to write on another thread while the loop keeps updating it."""
    pin = Pin()
    slices = table.read()
    table.mark_inflight(slices, [None, *([pin] * len(slices))])  # frame 0 of a reply is its header
    state = {sid: {key: np.array(arr, copy=True) for key, arr in st.items()} for sid, st in table.opt_state.items()}
    snap = Snapshot(table.job, table.shard_id, table.version, checkpoint.meta_of(table),
                    {sl.sid: sl.data for sl in slices}, state)
    return snap, pin


@dataclass(eq=False)
class Task:
    """One piece of file work and, once done, its outcome.

    `waiters` are called on the loop's thread, with the task, when the loop
    takes it done; only the loop touches them. `error` is empty on success.
    """

    kind: str
    job: str
    version: int = -1
    snapshot: Snapshot | None = None
    pin: Pin | None = None
    plan: object = None                 # LOAD, VERIFY: the job's plan to check the file against
    target: object = None               # LOAD: the table the reload replaces (the loop's business)
    waiters: list = field(default_factory=list)
    written: checkpoint.Written | None = None
    table: object = None                # LOAD: the table built from the checkpoint
    deleted: list = field(default_factory=list)
    error: str = ""


class CheckpointWriter:
    """The one thread doing a shard's checkpoint files; `fileno()` becomes readable when tasks are done."""

    def __init__(self, root: str | os.PathLike, shard_id: int, protect=lambda job: ()):
        self.root = Path(root)
        self.shard_id = shard_id
        self.protect = protect  # job -> versions a write must not delete (asked on this thread)
        self._cond = threading.Condition()
        self._queue: deque[Task] = deque()
        self._current: Task | None = None
        self._done: list[Task] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)

    def fileno(self) -> int:
        return self._rfd

    def start(self) -> None:
        if self._thread is None:
            # A daemon thread: a write stuck on a dead disk must not keep the process from exiting
            # once close() stopped waiting for it.
            self._thread = threading.Thread(target=self._run, name=f"checkpoint-writer-{self.shard_id}", daemon=True)
            self._thread.start()

    # --- asked by the loop ---

    def write(self, snap: Snapshot, pin: Pin, waiter=None) -> Task:
        """Queue `snap` for writing; a write of the same job waiting behind the one in progress
        takes it instead. The task."""
        with self._cond:
            last = self._last_queued(snap.job)
            # Only behind a write in progress: one that is merely about to start is let be, so a
            # checkpoint cut from an idle writer is always written.
            if last is not None and last.kind == WRITE and self._current is not None:
                last.pin.done = True  # its snapshot will never be written: release its slices
                last.snapshot, last.pin, last.version = snap, pin, snap.version
                task = last
            else:
                task = Task(WRITE, snap.job, snap.version, snapshot=snap, pin=pin)
                self._queue.append(task)
                self._cond.notify()
        if waiter is not None:
            task.waiters.append(waiter)
        return task

    def submit(self, task: Task) -> Task:
        with self._cond:
            self._queue.append(task)
            self._cond.notify()
        return task

    def _last_queued(self, job: str) -> Task | None:
        """The job's last task still waiting, when nothing of that job is queued after it."""
        for task in reversed(self._queue):
            if task.job == job:
                return task
        return None

    def idle(self) -> bool:
        """Nothing queued, running, or done and not yet taken."""
        with self._cond:
            return not (self._queue or self._current is not None or self._done)

    def take_done(self) -> list[Task]:
        """The tasks finished since the last call, in the order they finished (clears the pipe)."""
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass
        with self._cond:
            done, self._done = self._done, []
        return done

    def close(self, timeout_s: float) -> bool:
        """Finish the writes and removals queued (loads and checks are dropped), waiting at most
        `timeout_s`; False if the thread is still busy then (it is left to the process's exit)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return False  # its pipe stays open: closing it under a running thread could reuse the fd
        os.close(self._rfd)
        os.close(self._wfd)
        return True

    # --- the thread ---

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
        except (OSError, AttributeError):  # not Linux, or not allowed: the same priority as the loop
            pass
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                task = self._current = self._queue.popleft()
                closing = self._closing
            try:
                if closing and task.kind in (LOAD, VERIFY):
                    task.error = "the shard is shutting down"
                else:
                    self._do(task)
            except BadCheckpoint as exc:
                task.error = exc.reason
            except Exception as exc:  # a full disk, a bug: the loop reports it; the thread goes on
                log.exception("checkpoint work failed", extra={"job": task.job, "task": task.kind})
                task.error = f"{type(exc).__name__}: {exc}"
            finally:
                if task.pin is not None:
                    task.pin.done = True
                task.snapshot = None  # its copies are freed now, not when the loop gets to it
            with self._cond:
                self._current = None
                self._done.append(task)
            try:
                os.write(self._wfd, b"\0")
            except BlockingIOError:  # the pipe is full of wake-ups already: the loop will look
                pass

    def _do(self, task: Task) -> None:
        directory = checkpoint.job_dir(self.root, task.job, self.shard_id)
        if task.kind == WRITE:
            task.written = checkpoint.write(self.root, task.snapshot, protect=self.protect(task.job))
        elif task.kind in (LOAD, VERIFY):
            if task.version not in checkpoint.versions(directory):
                raise BadCheckpoint(f"no complete checkpoint of version {task.version} on shard {self.shard_id}")
            path = checkpoint.path_of(directory, task.version)
            t0 = time.perf_counter()
            loaded = checkpoint.load(path, job=task.job, shard_id=self.shard_id, plan=task.plan,
                                     keep=task.kind == LOAD)
            if task.kind == LOAD:
                task.table = checkpoint.build_table(loaded, self.shard_id)
                # The versions after this one belong to the history the job is leaving: a
                # restart must not load them.
                task.deleted = checkpoint.prune_newer(directory, task.version)
                log.info("checkpoint loaded", extra={"job": task.job, "version": task.version,
                                                     "seconds": round(time.perf_counter() - t0, 3)})
        elif task.kind == REMOVE:
            checkpoint.remove(self.root, task.job, self.shard_id)
