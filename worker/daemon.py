"""The worker daemon (`psctl worker`): register, take assignments, run them, repeat.

Stateless by design: everything it learns comes from the scheduler
(assignments) and the shards (parameters, clocks). Killing it loses
nothing but the step in progress.

It is ready (`on_ready` is called, once) when the scheduler has answered
its first registration; until then it keeps trying, with a warning naming
the scheduler every UNREACHABLE_WARN_S. The series of a job's metrics
end (`forget_job`) when the worker's assignment in the job ends.
"""
from __future__ import annotations

import logging
import os
import socket as pysocket
import threading
import time
from collections.abc import Callable

import zmq

from protocol.assignment import Assignment
from protocol.errors import ErrorCode
from protocol.messages import Assign, Register
from protocol.metrics import MetricsRegistry
from worker.client import CurveKeys, default_worker_id
from worker.heartbeat import HeartbeatThread
from worker.sched_client import SchedulerClient, SchedulerError, SchedulerUnavailable
from worker.task import DataCache, Task

log = logging.getLogger("pscluster.worker")

# How long one `assign` may be held by the scheduler when there is no work.
ASSIGN_WAIT_S = 10.0
# Registration: wait this long for each answer, then ask again on a fresh socket
# (Lazy Pirate), until the scheduler answers or the worker is stopped.
REGISTER_TIMEOUT_S = 2.0
# While the scheduler does not answer a registration: a warning this often (seconds).
UNREACHABLE_WARN_S = 10.0


class WorkerDaemon:
    """One worker process. `serve()` blocks until `stop()` (or SIGTERM via the CLI)."""

    def __init__(self, scheduler: str, device, *, worker_id: str | None = None, ctx: zmq.Context | None = None,
                 slowdown: float = 1.0, max_tasks: int | None = None, keys: CurveKeys | None = None,
                 data_roots: tuple[str, ...] = (), on_ready: Callable[[], None] | None = None):
        self.scheduler = scheduler
        self.device = device
        # With CURVE the id starts with the key's name: shards and the scheduler check that it does.
        self.worker = worker_id or default_worker_id(keys.identity.name if keys else None)
        self.ctx = ctx or zmq.Context.instance()
        self.slowdown = slowdown
        self.max_tasks = max_tasks
        self.keys = keys
        to_scheduler = keys.to(keys.scheduler) if keys else None
        self.sched = SchedulerClient(scheduler, ctx=self.ctx, worker=self.worker, keys=to_scheduler)
        self.heartbeat = HeartbeatThread(scheduler, self.worker, ctx=self.ctx, keys=to_scheduler)
        self.data = DataCache(roots=data_roots)  # idx:/npz: only under these (none: built-in sources only)
        self.metrics = MetricsRegistry("worker")
        self.on_ready = on_ready  # called once, from serve(): the scheduler answered the first registration
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Leave after the current step (the task sees the stop like a scheduler's)."""
        self._stopping.set()
        self.heartbeat.stop_requested.set()

    def register(self) -> bool:
        """Register with the scheduler, asking until it answers; False if stopped first.

        The heartbeat thread then beats at the interval it gave workers. A
        refusal raises SchedulerError.
        """
        msg = Register(role="worker", info={"host": pysocket.gethostname(), "pid": os.getpid(),
                                            "device": self.device.name})
        since, warned = time.monotonic(), None
        while True:  # until answered or stopped (each round waits REGISTER_TIMEOUT_S)
            if self._stopping.is_set():
                return False
            try:
                reply = self.sched.request(msg, timeout_s=REGISTER_TIMEOUT_S, retries=0)
                break
            except SchedulerUnavailable:
                now = time.monotonic()
                if warned is None or now - warned >= UNREACHABLE_WARN_S:
                    warned = now
                    log.warning("the scheduler does not answer; still trying",
                                extra={"scheduler": self.scheduler, "waited_s": round(now - since, 1)})
        interval = reply.body.get("heartbeat_interval_s")
        if interval is not None and not self.heartbeat.set_interval(interval):
            log.warning("ignored a heartbeat interval that is not a number", extra={"value": repr(interval)[:40]})
        self.heartbeat.reregister_needed.clear()
        log.info("registered", extra={"worker": self.worker, "scheduler": self.scheduler, "device": self.device.name,
                                      "heartbeat_s": self.heartbeat.interval_s})
        return True

    def serve(self) -> None:
        """Take and run assignments until stopped (registering first, for as long as that takes)."""
        if not self.register():
            self.sched.close()
            return
        if self.on_ready is not None:
            self.on_ready()
        self.heartbeat.start()
        done = 0
        following: Assignment | None = None
        try:
            while not self._stopping.is_set():
                if self.max_tasks is not None and done >= self.max_tasks:
                    return
                assignment, following = following or self._next_assignment(), None
                if assignment is None:
                    continue
                self.heartbeat.report(assignment.job, {})
                if self._stopping.is_set():
                    self.heartbeat.stop_requested.set()
                task = Task(assignment, worker=self.worker, device=self.device, sched=self.sched, keys=self.keys,
                            heartbeat=self.heartbeat, ctx=self.ctx, data=self.data, slowdown=self.slowdown,
                            metrics=self.metrics)
                outcome = task.run()
                log.info("assignment ended", extra={"job": assignment.job, "task": assignment.task,
                                                    "outcome": outcome.status, "detail": outcome.detail})
                self.heartbeat.report("", {})
                following = task.next_assignment
                if following is None or following.job != assignment.job:
                    self.metrics.forget_job(assignment.job)  # its series end with this worker's part in it
                self.metrics.inc("assignments_total", outcome=outcome.status)
                done += 1
        finally:
            self.heartbeat.close()
            self.sched.close()


    def _next_assignment(self) -> Assignment | None:
        if self.heartbeat.reregister_needed.is_set():
            self.register()
        try:
            reply = self.sched.request(Assign(wait_s=ASSIGN_WAIT_S), timeout_s=ASSIGN_WAIT_S + 5.0, retries=2)
        except SchedulerError as exc:
            if exc.code is ErrorCode.BAD_STATE:  # the scheduler restarted and forgot us
                self.register()
                return None
            raise
        except SchedulerUnavailable:
            if self._stopping.is_set():
                return None
            log.warning("scheduler unavailable; retrying", extra={"scheduler": self.scheduler})
            return None
        if not reply.body.get("task"):
            return None
        try:
            return Assignment.from_wire(reply.body)
        except ValueError as exc:
            log.error("unreadable assignment", extra={"why": str(exc)})
            return None
