"""The scheduler daemon (`psctl scheduler`): the I/O around the scheduler's state machine.

One ROUTER for everyone (servers, workers, users), one loop. Every
decoded message becomes a `Request` event for the state machine
(ps/sched/state.py), which holds every rule about jobs, partitions and
membership; this module only performs what the machine returns: replies
on the ROUTER, requests to shards (ps/shard_calls.py, whose answers come
back as events), rows written to the job store (ps/registry.py), and
stopping. A message that does not decode is answered here with an error
and never reaches the machine; an exception anywhere in the loop is
logged and the daemon goes on serving.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import zmq

from protocol.codec import encode
from protocol.jobstate import FINAL_STATES
from protocol.keys import ServerKeys
from protocol.messages import KINDS, Ok
from protocol.metrics import MetricsRegistry
from ps.registry import JobStore
from ps.router import RouterDaemon
from ps.sched.events import CallShard, Note, Persist, ReadNotes, Reply, Request, ShardAnswer, Stop, Tick
from ps.sched.state import HEARTBEAT_TIMEOUT_S, MAX_FAILURES, SchedulerState
from ps.shard_calls import ShardCalls
from ps.transport import bind_router, stop_authenticator

log = logging.getLogger("pscluster.scheduler")

# Parameters a job's model may have by default: a quarter of this machine's
# memory (shards keep optimizer state beside them, workers gradients).
MEMORY_SHARE_FOR_MODELS = 4


def default_max_model_bytes() -> int:
    """A quarter of the physical memory, or 4 GiB where it cannot be read."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MEMORY_SHARE_FOR_MODELS
    except (ValueError, OSError, AttributeError):
        return 4 << 30


class Scheduler(RouterDaemon):
    """The scheduler. `serve()` blocks until shutdown or `stop()`."""

    ROLE = "scheduler"
    log = log

    def __init__(self, bind: str, state_dir: str, *, ctx: zmq.Context | None = None,
                 heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S, max_model_bytes: int | None = None,
                 max_failures: int = MAX_FAILURES, metrics: MetricsRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic, keys: ServerKeys | None = None):
        self.ctx = ctx or zmq.Context.instance()
        self.store = JobStore(state_dir)
        records = self.store.load()
        self.keys = keys
        self.sock, self.endpoint = bind_router(self.ctx, bind, keys)
        self.links = ShardCalls(self.ctx, keys)
        self.metrics = metrics or MetricsRegistry("scheduler")
        self.now = clock
        self.stopping = False
        self.state = SchedulerState(
            records, incarnation=self.store.next_incarnation(), heartbeat_timeout_s=heartbeat_timeout_s,
            max_model_bytes=default_max_model_bytes() if max_model_bytes is None else max_model_bytes,
            max_failures=max_failures, metrics=self.metrics, wall_offset=time.time() - clock(),
            public_key=keys.ring.public.get if keys is not None else None)
        # A row load() skipped stays in the store with its number: new jobs are numbered after it, or the
        # first submit would collide with it on disk.
        self.state.next_seq = max(self.state.next_seq, self.store.last_seq() + 1)
        # Every message kind goes to the machine, which answers the ones it does not serve.
        self.ops = dict.fromkeys(KINDS, self._dispatch)

    # --- lifecycle ---

    def serve(self) -> None:
        log.info("serving", extra={"addr": self.endpoint, "state": str(self.store.path)})
        self._serve_loop(lambda: {sock: lambda sock=sock: self.links.on_readable(sock)
                                  for sock in self.links.poll_sockets()})

    def stop(self) -> None:
        self.stopping = True

    def close(self) -> None:
        self.sock.close(0)
        if self.keys is not None:
            stop_authenticator(self.ctx)
        self.links.close()
        self.store.close()

    def tick(self, now: float) -> None:
        """Periodic work (time passed in): shard requests' re-sends, then the machine's tick."""
        self.links.tick(now)
        self._perform(self.state.handle(Tick(now)))

    # --- the machine's I/O ---

    def _dispatch(self, envelope: list, msg) -> None:
        self._perform(self.state.handle(Request(envelope, msg, self.now(), self.identity)))

    def _answered(self, call: int, reply) -> None:
        self._perform(self.state.handle(ShardAnswer(call, reply, self.now())))

    def _perform(self, instructions: list) -> None:
        """Carry out the machine's instructions in order; a failed write stops the replies after it."""
        self.store.add_events([inst for inst in instructions if isinstance(inst, Note)])  # one transaction
        for inst in instructions:
            if isinstance(inst, Reply):
                self._send(inst.peer, encode(inst.msg))
            elif isinstance(inst, CallShard):
                self.links.request(inst.addr, inst.msg, lambda reply, call=inst.call: self._answered(call, reply),
                                   self.now(), key=inst.key)
            elif isinstance(inst, Persist):
                if inst.new:
                    self.store.insert(inst.fields)
                else:
                    self.store.update(inst.job, inst.fields)
                if inst.fields.get("state") in FINAL_STATES:
                    self.metrics.forget_job(inst.job)  # a job's series end with it
            elif isinstance(inst, ReadNotes):
                events = self.store.events(inst.job, inst.after, inst.limit)
                body = {"events": events, "next": events[-1]["seq"] if events else inst.after, "state": inst.state}
                self._send(inst.peer, encode(Ok(rid=inst.rid, job=inst.job, body=body)))
            elif isinstance(inst, Stop):
                self.stopping = True
