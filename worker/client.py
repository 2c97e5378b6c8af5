"""The parameter client: pull, push and push_pull across every shard at once.

One DEALER per shard. A request goes to all shards that hold a wanted
slice, then the replies are gathered with one poll; each reply's slices
are copied once, straight into the result tensors (or into arrays the
caller passes as `out`, e.g. the model's own parameters), as soon as that
reply arrives, while the other shards' replies are still on the way.
Received frames are never kept: their buffers go back to the allocator for
the next reply (see `keep_freed_buffers`).

Requests are retried Lazy-Pirate style: a shard that does not answer within
`timeout_s` gets the same request (same request id) again on a fresh
socket; shards answer repeats without applying them twice. After `retries`
repeats the call raises ShardTimeout naming the shard. Requests a policy
may hold on purpose (clocked pulls under BSP/SSP) are retried for up to
`max_wait_s` instead. An `error` reply raises ShardError with its code and
sentence. With `resolve` (the job's current shard addresses, e.g. from the
scheduler's heartbeat replies), a shard that was restarted at another
address is followed: the request goes to the new address at once. Sockets
are made, sent on and read by worker/transport.py.
"""
from __future__ import annotations

import itertools
import os
import socket as pysocket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import zmq

from protocol.codec import decode, encode, raise_if_error
from protocol.errors import ErrorCode, ProtocolError
from protocol.keys import ClientKeys, Identity, KeyRing
from protocol.messages import Create, Load, Message, Ok, Pull, Push, PushPull, SliceData, Stats
from protocol.partitions import partition_index
from protocol.plan import Plan
from worker.transport import connect_dealer, recv_message, send_message

# Default wait for one reply before the request is re-sent (Lazy Pirate).
REQUEST_TIMEOUT_S = 10.0
# Re-sends before a silent shard is reported.
REQUEST_RETRIES = 3
# Longest a clocked pull may be held by a consistency policy in total.
MAX_POLICY_WAIT_S = 600.0
# While replies are awaited, how often `resolve` is asked whether a shard moved.
ADDRESS_CHECK_INTERVAL_S = 0.5
# Plain int: pyzmq's flag enums cost a microsecond per use on the data path.
_POLLIN = int(zmq.POLLIN)


class ShardTimeout(TimeoutError):
    """A shard did not answer in time; the message names it."""


class ShardError(RuntimeError):
    """A shard answered with an error reply."""

    def __init__(self, shard: int, addr: str, exc: ProtocolError):
        super().__init__(f"shard {shard} at {addr} refused the request: {exc.code.value}: {exc.message}")
        self.shard = shard
        self.code = exc.code
        self.reason = exc.message


def default_worker_id(prefix: str | None = None) -> str:
    """[prefix-]host-pid-random: unique per process, readable in logs (prefix: a CURVE key's name)."""
    base = f"{pysocket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return f"{prefix}-{base}" if prefix else base


@dataclass(frozen=True)
class CurveKeys:
    """A CURVE client's keys: its own identity and pair, and the scheduler's public key.

    Workers and `psctl` commands load them from a curve dir (protocol/keys.py);
    a shard's public key comes with each assignment or export.
    """

    identity: Identity
    public: str
    secret: str
    scheduler: str

    @classmethod
    def load(cls, curve_dir: str, role: str, name: str | None = None) -> CurveKeys:
        """From DIR/ROLE/NAME.key_secret and the scheduler's public key; KeyFileError names what is missing."""
        ring = KeyRing(curve_dir)
        identity, public, secret = ring.own(role, name)
        return cls(identity, public, secret, ring.scheduler_key())

    @property
    def pair(self) -> tuple[str, str]:
        return self.public, self.secret

    def to(self, server: str) -> ClientKeys:
        return ClientKeys(self.public, self.secret, server)


class ParamClient:
    """Talks to the shards of one job. Not thread-safe: one per thread.

    All calls block until every involved shard answered; they raise
    ShardTimeout, ShardError or ValueError (bad arguments). Arguments are
    checked before anything is sent; after a ShardTimeout or ShardError,
    arrays passed as `out` may hold the new values of some shards' slices.
    """

    def __init__(self, shards: Sequence[str], plan: Plan, *, job: str, worker: str | None = None,
                 ctx: zmq.Context | None = None, timeout_s: float = REQUEST_TIMEOUT_S,
                 retries: int = REQUEST_RETRIES, max_wait_s: float = MAX_POLICY_WAIT_S,
                 resolve: Callable[[], Sequence[str] | None] | None = None,
                 curve: tuple[str, str] | None = None, shard_keys: Sequence[str] = ()):
        if len(shards) != plan.num_shards:
            raise ValueError(f"the plan has {plan.num_shards} shards but {len(shards)} addresses were given")
        self.addrs = list(shards)
        self.plan = plan
        self.job = job
        self.worker = worker or default_worker_id()
        self.ctx = ctx or zmq.Context.instance()
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_wait_s = max_wait_s
        self.resolve = resolve
        # CURVE: this process's (public, secret) pair and each shard's public key.
        self.curve = curve
        self.shard_keys = list(shard_keys) or [""] * len(self.addrs)
        self.versions: list[int] = [-1] * len(self.addrs)  # last version seen per shard
        self.clocks: list[int] = [-1] * len(self.addrs)    # our clock on each shard, as it reported
        # Per shard, the clock of each partition we hold there ("p3" -> steps done), as it reported.
        self.held: list[dict[str, int]] = [{} for _ in self.addrs]
        self._rids = itertools.count(1)
        self._socks: list[zmq.Socket | None] = [None] * len(self.addrs)
        self._on_shard = [plan.slices_on(k) for k in range(plan.num_shards)]
        self._tensors = {t.name: t for t in plan.tensors}
        self._sids_of: dict[str, list[int]] = {name: [s.sid for s in plan.slices_of(name)] for name in self._tensors}
        self._slice = {s.sid: s for s in plan.slices}
        # Per tensor, where each of its slices lives: (shard, sid, start, stop).
        self._pieces = {name: [(self._slice[sid].shard, sid, self._slice[sid].start, self._slice[sid].stop)
                               for sid in sids] for name, sids in self._sids_of.items()}
        # Shards holding any slice; a request for every tensor names no sids
        # (the shard sends all it holds), which keeps the header small.
        self._all_shards = sorted({s.shard for s in plan.slices})

    # --- sockets ---

    def _sock(self, k: int) -> zmq.Socket:
        sock = self._socks[k]
        if sock is None:
            keys = ClientKeys(*self.curve, self.shard_keys[k]) if self.curve and self.shard_keys[k] else None
            sock = self._socks[k] = connect_dealer(self.ctx, self.addrs[k], keys=keys)
        return sock

    def _reset(self, k: int) -> None:
        if self._socks[k] is not None:
            self._socks[k].close(0)
            self._socks[k] = None

    def close(self) -> None:
        for k in range(len(self._socks)):
            self._reset(k)

    def __enter__(self) -> ParamClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the request engine ---

    def _exchange(self, requests: dict[int, Message], *, patient: bool = False,
                  sink: Callable[[Ok], None] | None = None) -> dict[int, Ok]:
        """Send each shard its request and gather every reply (Lazy Pirate).

        `patient`: the request may be held by a policy, so keep re-sending
        until max_wait_s rather than giving up after `retries`. `sink` is
        called with each reply as it arrives (before the others are in).
        """
        frames = {k: encode(msg) for k, msg in requests.items()}
        for k, f in frames.items():
            send_message(self._sock(k), f)
        replies: dict[int, Ok] = {}
        tries = dict.fromkeys(requests, 0)
        started = time.monotonic()
        deadline = dict.fromkeys(requests, started + self.timeout_s)
        waiting = list(requests)
        check_ms = int(ADDRESS_CHECK_INTERVAL_S * 1000) if self.resolve is not None else None
        while waiting:
            wait_ms = max(0, int((min(deadline[k] for k in waiting) - time.monotonic()) * 1000))
            if check_ms is not None:
                wait_ms = min(wait_ms, check_ms)
            # zmq_poll on a fresh list: a Poller object per wait costs more than the poll.
            ready = [sock for sock, _events in zmq.zmq_poll([(self._socks[k], _POLLIN) for k in waiting], wait_ms)]
            for k in waiting:
                if self._socks[k] in ready:
                    reply = self._receive(k, requests[k])
                    if reply is not None:
                        replies[k] = reply
                        if sink is not None:
                            sink(reply)
            waiting = [k for k in waiting if k not in replies]
            if not waiting:
                break
            now = time.monotonic()
            # A moved shard answers nothing: look for moves only when a wait came back empty,
            # never on the path of replies arriving.
            for k in self._follow_moves(waiting) if not ready else ():  # restarted elsewhere: ask it there now
                send_message(self._sock(k), frames[k])
                deadline[k] = now + self.timeout_s
            for k in waiting:
                if now < deadline[k]:
                    continue
                tries[k] += 1
                out_of_time = now - started >= self.max_wait_s if patient else tries[k] > self.retries
                if out_of_time:
                    raise ShardTimeout(
                        f"shard {k} at {self.addrs[k]} did not answer '{requests[k].OP}' for job {self.job!r} "
                        f"within {now - started:.1f}s ({tries[k] - 1} retries)")
                self._reset(k)  # Lazy Pirate: a fresh socket, the same request
                send_message(self._sock(k), frames[k])
                deadline[k] = now + self.timeout_s * (1 if patient else min(2 ** tries[k], 8))
        return replies

    def _follow_moves(self, shards: Sequence[int]) -> list[int]:
        """Those of `shards` that `resolve` now places at another address; their sockets are reset to it."""
        if self.resolve is None:
            return []
        current = self.resolve()
        if not current or len(current) != len(self.addrs):
            return []
        moved = [k for k in shards if current[k] != self.addrs[k]]
        for k in moved:
            self._reset(k)
            self.addrs[k] = current[k]
        return moved

    def _receive(self, k: int, request: Message) -> Ok | None:
        try:
            frames = recv_message(self._socks[k])
        except zmq.Again:
            return None
        try:
            reply = raise_if_error(decode(frames))
        except ProtocolError as exc:
            if exc.rid not in (0, request.rid):
                return None  # an answer to an older request on this socket
            raise ShardError(k, self.addrs[k], exc) from None
        if reply.rid != request.rid:
            return None
        if not isinstance(reply, Ok):
            raise ShardError(k, self.addrs[k], ProtocolError(ErrorCode.BAD_FRAME, f"unexpected reply op {reply.OP}"))
        body = reply.body
        version = body.get("version")
        if type(version) is int:
            self.versions[k] = version
        clock = body.get("clock")
        if type(clock) is int:
            self.clocks[k] = clock
        held = body.get("held")
        self.held[k] = {key: c for key, c in held.items() if type(c) is int} if type(held) is dict else {}
        return reply

    # --- helpers ---

    def _common(self, k: int, clock: int | None) -> dict:
        return {"rid": next(self._rids), "job": self.job, "worker": self.worker,
                "clock": self.clocks[k] if clock is None else clock}

    def _grad_slices(self, grads: Mapping[str, np.ndarray]) -> dict[int, list[SliceData]]:
        per_shard: dict[int, list[SliceData]] = {}
        for name, grad in grads.items():
            spec = self._tensors.get(name)
            if spec is None:
                raise ValueError(f"tensor {name!r} is not in job {self.job!r}'s plan")
            flat = np.ascontiguousarray(grad, dtype=spec.dtype).reshape(-1)
            if flat.size != spec.size:
                raise ValueError(f"gradient {name!r} has {flat.size} elements; the plan says {spec.size}")
            for shard, sid, start, stop in self._pieces[name]:
                sl = SliceData(sid, flat[start:stop])
                if shard in per_shard:
                    per_shard[shard].append(sl)
                else:
                    per_shard[shard] = [sl]
        return per_shard

    def _wanted(self, names: Sequence[str] | None) -> dict[int, list[int]]:
        """Slice ids to ask each shard for; an empty list means all it holds (names=None)."""
        if names is None:
            return {k: [] for k in self._all_shards}
        per_shard: dict[int, list[int]] = {}
        for name in names:
            if name not in self._tensors:
                raise ValueError(f"tensor {name!r} is not in job {self.job!r}'s plan")
            for shard, sid, _start, _stop in self._pieces[name]:
                per_shard.setdefault(shard, []).append(sid)
        return per_shard

    def _results(self, names: Sequence[str] | None,
                 out: Mapping[str, np.ndarray] | None) -> tuple[dict[str, np.ndarray], Callable[[Ok], None]]:
        """The result tensors (from `out` where given, checked) and a sink that copies a reply into them."""
        names = list(self._tensors) if names is None else list(names)
        result: dict[str, np.ndarray] = {}
        for name in names:
            spec = self._tensors[name]
            arr = None if out is None else out.get(name)
            if arr is None:
                arr = np.empty(spec.shape, dtype=spec.dtype)
            elif arr.shape != spec.shape or arr.dtype != np.dtype(spec.dtype) or not arr.flags.c_contiguous:
                raise ValueError(f"out[{name!r}] must be a C-contiguous {spec.dtype} array of shape {spec.shape}")
            result[name] = arr
        flats = {name: arr.reshape(-1) for name, arr in result.items()}
        where = self._slice

        def sink(reply: Ok) -> None:
            for sl in reply.slices:
                s = where.get(sl.sid)
                flat = None if s is None else flats.get(s.name)
                if flat is not None:
                    flat[s.start:s.stop] = sl.data  # the one copy: frame -> result

        return result, sink

    # --- public API ---

    def create(self, arrays: Mapping[str, np.ndarray], *, optimizer: dict | None = None,
               policy: dict | None = None, nonlearned: Sequence[str] = (), checkpoint_every: int = 0) -> bool:
        """Create the job's table on every shard from initial values; True if it already existed everywhere."""
        missing = sorted(set(self._tensors) - set(arrays))
        if missing:
            raise ValueError(f"initial value of {missing[0]!r} is missing")
        per_shard = self._grad_slices(arrays)
        requests = {
            k: Create(**self._common(k, -1), plan=self.plan.to_wire(), optimizer=optimizer or {},
                      policy=policy or {}, nonlearned=list(nonlearned), checkpoint_every=checkpoint_every,
                      slices=tuple(per_shard.get(k, ())))
            for k in range(len(self.addrs))
        }
        replies = self._exchange(requests)
        return all(r.body.get("existed") for r in replies.values())

    def load(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Send the initial values of a job whose tables the scheduler created; once every shard has them."""
        missing = sorted(set(self._tensors) - set(arrays))
        if missing:
            raise ValueError(f"initial value of {missing[0]!r} is missing")
        per_shard = self._grad_slices(arrays)
        self._exchange({k: Load(**self._common(k, -1), slices=tuple(per_shard.get(k, ())))
                        for k in range(len(self.addrs))})

    def pull(self, names: Sequence[str] | None = None, *, clock: int | None = -1,
             out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Current values of `names` (all tensors when None).

        clock: -1 reads at once; a step number lets the job's policy hold the
        pull until that step may start; None uses the clock each shard last
        reported for this worker. Values are copied into `out[name]` when given.
        """
        wanted = self._wanted(names)
        result, sink = self._results(names, out)
        requests = {k: Pull(**self._common(k, clock), sids=sids) for k, sids in wanted.items()}
        self._exchange(requests, patient=clock != -1, sink=sink)
        return result

    def push(self, grads: Mapping[str, np.ndarray], *, clock: int | None = -1, norm: float = -1.0,
             parts: Sequence[int] = ()) -> None:
        """Send gradients (for step `clock`) to the shards holding them; returns once all acknowledged.

        parts: the data partitions this is one step of (their mean gradient); empty: this worker's own step.
        """
        per_shard = self._grad_slices(grads)
        requests = {k: Push(**self._common(k, clock), base_version=self.versions[k], norm=norm, parts=list(parts),
                            slices=tuple(sl))
                    for k, sl in per_shard.items()}
        self._exchange(requests)

    def push_pull(self, grads: Mapping[str, np.ndarray], *, clock: int | None = -1, norm: float = -1.0,
                  names: Sequence[str] | None = None, parts: Sequence[int] = (),
                  out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Push step `clock`'s gradients and get the values for the next step, one round trip per shard.

        parts: as for `push`.
        """
        per_shard = self._grad_slices(grads)
        wanted = self._wanted(names)
        result, sink = self._results(names, out)
        shards = sorted(set(per_shard) | set(wanted))
        requests = {
            k: PushPull(**self._common(k, clock), base_version=self.versions[k], norm=norm, parts=list(parts),
                        sids=wanted.get(k, []), slices=tuple(per_shard.get(k, ())))
            for k in shards
        }
        self._exchange(requests, patient=clock != -1, sink=sink)
        return result

    def part_steps(self) -> dict[int, int]:
        """Steps each partition we hold has completed: the least any shard reported (after a pull or push)."""
        steps: dict[int, int] = {}
        for held in self.held:
            for key, clock in held.items():
                index = partition_index(key)
                if index is not None:
                    steps[index] = min(steps.get(index, clock), clock)
        return steps

    def stats(self) -> list[dict]:
        """Every shard's `stats` body (counters, tables), in shard order."""
        replies = self._exchange({k: Stats(**self._common(k, -1)) for k in range(len(self.addrs))})
        return [replies[k].body for k in range(len(self.addrs))]
