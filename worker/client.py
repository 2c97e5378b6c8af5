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
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import zmq

from protocol.compression import Compressor
from protocol.keys import ClientKeys, Identity, KeyRing
from protocol.messages import Create, Load, Message, Ok, Pull, Push, PushPull, SliceData, Stats
from protocol.partitions import partition_index
from protocol.plan import Plan
from worker.flight import Flight, ShardError, ShardTimeout
from worker.transport import connect_dealer

__all__ = ["PIECE_BYTES", "PIECE_WINDOW", "CurveKeys", "ParamClient", "ShardError", "ShardTimeout", "StepStream",
           "default_worker_id", "piece_bound"]

# Default wait for one reply before the request is re-sent (Lazy Pirate).
REQUEST_TIMEOUT_S = 10.0
# Re-sends before a silent shard is reported.
REQUEST_RETRIES = 3
# Longest a clocked pull may be held by a consistency policy in total.
MAX_POLICY_WAIT_S = 600.0
# Largest message the client sends or asks for (a piece): well under the
# shards' --max-message-bytes (512 MiB by default), large enough that the
# per-message cost is lost in the copy (bench: `psctl bench pushpull`). A
# slice larger than this (partition_bytes above it) travels alone.
PIECE_BYTES = 4 * 1024**2
# What a piece leaves of a shard's --max-message-bytes for its header (the slices' metadata).
PIECE_HEADER_SHARE = 4


def piece_bound(max_message_bytes: int) -> int:
    """The piece bound under the shards' message limit (0: not known, PIECE_BYTES)."""
    if max_message_bytes <= 0:
        return PIECE_BYTES
    return max(1, min(PIECE_BYTES, max_message_bytes - max_message_bytes // PIECE_HEADER_SHARE))


# Pieces in flight to one shard: what a shard holds of one worker's request
# at a time (PIECE_WINDOW x PIECE_BYTES), and enough to keep the link busy.
PIECE_WINDOW = 4


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
                 curve: tuple[str, str] | None = None, shard_keys: Sequence[str] = (),
                 piece_bytes: int = PIECE_BYTES, window: int = PIECE_WINDOW, compression: str | None = None):
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
        self.piece_bytes = max(1, int(piece_bytes))
        self.window = max(1, int(window))
        # Gradients on the wire (the job's `compression`); keeps top-k's residuals between steps.
        self.compressor = Compressor(compression)
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
        # All of a shard's slices in pieces under the bound; [[]] (ask for all) when they fit in one.
        self._all_pieces = {k: self._cut(self._on_shard[k], lambda s: s.nbytes, lambda s: s.sid)
                            for k in self._all_shards}
        for k, pieces in self._all_pieces.items():
            if len(pieces) == 1:
                self._all_pieces[k] = [[]]
        self._wanted_by: dict[tuple, dict[int, list[list[int]]]] = {}
        # Whether any shard's share takes more than one piece: only then can a step's
        # gradient go out in early pieces while the rest is computed (worker/task.py).
        self.in_pieces = any(len(p) > 1 for p in self._all_pieces.values())

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

    # --- the request engine (worker/flight.py) ---

    def _flight(self, sink: Callable[[int, Ok], None] | None = None) -> Flight:
        return Flight(self, window=self.window, sink=sink)

    def _exchange(self, requests: dict[int, Message], *, patient: bool = False,
                  sink: Callable[[Ok], None] | None = None) -> dict[int, Ok]:
        """One message to each shard (each under the piece bound); every reply."""
        flight = self._flight(None if sink is None else lambda _k, reply: sink(reply))
        for k, msg in requests.items():
            flight.add(k, msg, patient=patient)
        return flight.wait()

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

    def _note(self, k: int, reply: Ok) -> None:
        """What every reply tells: the shard's version, our clock there, the steps of our partitions."""
        body = reply.body
        version = body.get("version")
        if type(version) is int:
            self.versions[k] = version
        clock = body.get("clock")
        if type(clock) is int:
            self.clocks[k] = clock
        held = body.get("held")
        self.held[k] = {key: c for key, c in held.items() if type(c) is int} if type(held) is dict else {}

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

    def _wanted(self, names: Sequence[str] | None) -> dict[int, list[list[int]]]:
        """Slice ids to ask each shard for, in pieces under the bound; [[]] means all it holds (it fits one).
        The same names ask the same way every step: the answer is kept (callers copy before changing it)."""
        if names is None:
            return {k: self._all_pieces[k] for k in self._all_shards}
        key = tuple(names)
        known = self._wanted_by.get(key)
        if known is None:
            known = self._wanted_by[key] = self._cut_wanted(names)
        return known

    def _cut_wanted(self, names: Sequence[str]) -> dict[int, list[list[int]]]:
        per_shard: dict[int, list[int]] = {}
        for name in names:
            if name not in self._tensors:
                raise ValueError(f"tensor {name!r} is not in job {self.job!r}'s plan")
            for shard, sid, _start, _stop in self._pieces[name]:
                per_shard.setdefault(shard, []).append(sid)
        return {k: self._cut([self._slice[sid] for sid in sids], lambda s: s.nbytes, lambda s: s.sid)
                for k, sids in per_shard.items()}

    def _cut(self, items: Sequence, size, pick) -> list[list]:
        """`items` in runs of at most piece_bytes (by `size`), at least one each; `pick` of each."""
        pieces: list[list] = []
        run: list = []
        total = 0
        for item in items:
            n = size(item)
            if run and total + n > self.piece_bytes:
                pieces.append(run)
                run, total = [], 0
            run.append(pick(item))
            total += n
        if run or not pieces:
            pieces.append(run)
        return pieces

    def _slice_pieces(self, slices: Sequence[SliceData]) -> list[list[SliceData]]:
        return self._cut(slices, lambda sl: sl.data.nbytes, lambda sl: sl)

    def _results(self, names: Sequence[str] | None,
                 out: Mapping[str, np.ndarray] | None) -> tuple[dict[str, np.ndarray], Callable[[int, Ok], None]]:
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

        def sink(_k: int, reply: Ok) -> None:
            for sl in reply.slices:
                s = where.get(sl.sid)
                flat = None if s is None else flats.get(s.name)
                if flat is not None:
                    flat[s.start:s.stop] = sl.data  # the one copy: frame -> result

        return result, sink

    # --- public API ---

    def create(self, arrays: Mapping[str, np.ndarray], *, optimizer: dict | None = None,
               policy: dict | None = None, nonlearned: Sequence[str] = (), checkpoint_every: int = 0) -> bool:
        """Create the job's table on every shard from initial values; True if it already existed everywhere.

        A shard whose values fit in one piece gets them with the `create`; any
        other table is created empty and its values follow in pieces (`load`,
        which under CURVE only a worker's key may send: in a job the scheduler
        creates the tables and the initialising worker loads them), so no
        message carries more than the piece bound whatever the model's size.
        """
        missing = sorted(set(self._tensors) - set(arrays))
        if missing:
            raise ValueError(f"initial value of {missing[0]!r} is missing")
        per_shard = self._grad_slices(arrays)
        whole = {k: pieces[0] for k in range(len(self.addrs))
                 if len(pieces := self._slice_pieces(per_shard.get(k, []))) == 1}
        requests = {
            k: Create(**self._common(k, -1), plan=self.plan.to_wire(), optimizer=optimizer or {},
                      policy=policy or {}, nonlearned=list(nonlearned), checkpoint_every=checkpoint_every,
                      slices=tuple(whole.get(k, ())))
            for k in range(len(self.addrs))
        }
        replies = self._exchange(requests)
        if all(r.body.get("existed") for r in replies.values()):
            return True
        later = [k for k, r in replies.items() if not r.body.get("existed") and k not in whole]
        if later:
            self.load(arrays, only=later)
        return False

    def load(self, arrays: Mapping[str, np.ndarray], *, only: Sequence[int] | None = None) -> None:
        """Send the initial values of a job whose tables were created without them, in pieces;
        returns once every shard (of `only`, when given) has all of them."""
        missing = sorted(set(self._tensors) - set(arrays))
        if missing:
            raise ValueError(f"initial value of {missing[0]!r} is missing")
        per_shard = self._grad_slices(arrays)
        flight = self._flight()
        for k in range(len(self.addrs)) if only is None else only:
            for piece in self._slice_pieces(per_shard.get(k, [])):
                flight.add(k, Load(**self._common(k, -1), slices=tuple(piece)))
        flight.wait()

    def pull(self, names: Sequence[str] | None = None, *, clock: int | None = -1,
             out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Current values of `names` (all tensors when None).

        clock: -1 reads at once; a step number lets the job's policy hold the
        pull until that step may start; None uses the clock each shard last
        reported for this worker. Values are copied into `out[name]` when given.
        """
        wanted = self._wanted(names)
        result, sink = self._results(names, out)
        flight = self._flight(sink)
        for k, pieces in wanted.items():
            for sids in pieces:
                flight.add(k, Pull(**self._common(k, clock), sids=sids), patient=clock != -1)
        flight.wait()
        return result

    def push(self, grads: Mapping[str, np.ndarray], *, clock: int | None = -1, norm: float = -1.0,
             parts: Sequence[int] = ()) -> None:
        """Send gradients (for step `clock`) to the shards holding them; returns once all acknowledged.

        parts: the data partitions this is one step of (their mean gradient); empty: this worker's own step.
        """
        stream = StepStream(self, clock=clock, norm=norm, parts=parts, pull=False)
        stream.send(grads)
        stream.finish()

    def push_pull(self, grads: Mapping[str, np.ndarray], *, clock: int | None = -1, norm: float = -1.0,
                  names: Sequence[str] | None = None, parts: Sequence[int] = (),
                  out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Push step `clock`'s gradients and get the values for the next step, one round trip per piece.

        parts: as for `push`.
        """
        stream = StepStream(self, clock=clock, norm=norm, parts=parts, names=names, out=out)
        stream.send(grads)
        return stream.finish()

    def stream(self, *, clock: int | None = -1, norm: float = -1.0, names: Sequence[str] | None = None,
               parts: Sequence[int] = (), out: Mapping[str, np.ndarray] | None = None) -> StepStream:
        """A push_pull whose gradients are sent as they become ready (`send`, then `finish`):
        pieces go out while the caller computes the rest (worker/task.py, backprop by layer)."""
        return StepStream(self, clock=clock, norm=norm, parts=parts, names=names, out=out)

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


class StepStream:
    """One step's push (and pull of the next step's values), sent in pieces as gradients become ready.

    `send(grads)` cuts the given tensors' gradients into slices and sends
    every full piece (at most the client's piece bound) as an early piece
    (`Push(more=True)`), which the shard applies or sums as it arrives;
    `finish()` sends what is left as each shard's last piece (a PushPull
    asking for the first piece of values, then Pulls for the rest, at the
    next step's clock), waits for every reply and returns the values. The
    arrays given to `send` must not change until `finish` returns (they are
    sent without a copy). A tensor sent twice is a ValueError.
    """

    def __init__(self, client: ParamClient, *, clock: int | None, norm: float, parts: Sequence[int] = (),
                 names: Sequence[str] | None = None, out: Mapping[str, np.ndarray] | None = None,
                 pull: bool = True):
        self.c = client
        self.clock = clock
        self.norm = norm
        self.parts = list(parts)
        self.pull = pull
        self.names = names
        self.missing: dict[str, int] = {}   # slices of each result tensor not in yet (names given)
        sink = None
        if pull:
            self.wanted = client._wanted(names)
            self.result, sink = client._results(names, out)
            if names is not None:   # counted only for `wait_for`, which takes names
                copy = sink
                self.missing = {name: len(client._sids_of[name]) for name in self.result}
                where, missing = client._slice, self.missing

                def sink(k: int, reply: Ok) -> None:
                    copy(k, reply)
                    for sl in reply.slices:
                        s = where.get(sl.sid)
                        if s is not None and s.name in missing:
                            missing[s.name] -= 1
        else:
            self.wanted, self.result = {}, {}
        self.flight = client._flight(sink)
        self.base = list(client.versions)  # the versions this step's gradient was computed from
        self.pending: dict[int, list[SliceData]] = {}
        self.pending_bytes: dict[int, int] = {}
        self.sent: set[str] = set()

    def _head(self, k: int) -> dict:
        return {**self.c._common(k, self.clock), "base_version": self.base[k], "norm": self.norm,
                "parts": self.parts, "coding": self.c.compressor.coding}

    def send(self, grads: Mapping[str, object]) -> None:
        """Queue these tensors' gradients; every full piece goes out now.

        A value may be an array or a row source (`rows(start, stop)` and
        `shape`, as worker/nn/model.py's RowBlocks): its slices are made one
        at a time as they go, and the caller waits while more than a window
        of pieces is queued, so at most a few pieces of it exist at once.
        """
        again = self.sent.intersection(grads)
        if again:
            raise ValueError(f"gradient of {sorted(again)[0]!r} was sent already in this step")
        self.sent.update(grads)
        c = self.c
        arrays = {name: g for name, g in grads.items() if not hasattr(g, "rows")}
        for k, slices in c._grad_slices(arrays).items():
            for sl in slices:
                self._add(k, sl)
        for name, source in grads.items():
            if name not in arrays:
                self._send_rows(name, source)
        if self.flight.busy():  # replies of early pieces may be in: take them (no wait)
            self.flight.pump(block=False)

    def _add(self, k: int, sl: SliceData) -> None:
        """One gradient slice into shard k's run; a full run goes out as an early piece."""
        c = self.c
        # one frame, or top-k's pair: never cut apart (float32 as it is: no call on the common path)
        frames = (sl,) if c.compressor.kind == "none" else c.compressor.encode(sl)
        size = sl.data.nbytes if len(frames) == 1 and frames[0] is sl else sum(f.data.nbytes for f in frames)
        run = self.pending.get(k)
        if run is None:
            run = self.pending[k] = []
        total = self.pending_bytes.get(k, 0)
        if run and total + size > c.piece_bytes:
            self.flight.add(k, Push(**self._head(k), more=True, slices=tuple(run)))
            run = self.pending[k] = []
            total = 0
        run.extend(frames)
        self.pending_bytes[k] = total + size

    def _send_rows(self, name: str, source) -> None:
        c = self.c
        spec = c._tensors.get(name)
        if spec is None:
            raise ValueError(f"tensor {name!r} is not in job {c.job!r}'s plan")
        if tuple(source.shape) != tuple(spec.shape) or len(spec.shape) != 2:
            raise ValueError(f"gradient {name!r} has shape {tuple(source.shape)}; the plan says {spec.shape}")
        width = spec.shape[1]
        for shard, sid, start, stop in c._pieces[name]:
            first = start // width
            block = source.rows(first, -(-stop // width)).reshape(-1)
            self._add(shard, SliceData(sid, block[start - first * width:stop - first * width]))
            self.flight.throttle(self.c.window)

    def finish(self, *, wait: bool = True) -> dict[str, np.ndarray]:
        """Send each shard its last piece (and the pulls of the next step's values); wait for every
        reply, or with `wait` False return at once (then `wait_for` and `wait` take the replies)."""
        c = self.c
        patient = self.clock != -1
        for k in sorted(set(self.pending) | set(self.wanted)):
            clock = c.clocks[k] if self.clock is None else self.clock  # what the last piece carries
            next_clock = clock + 1 if clock >= 0 else -1
            run = tuple(self.pending.get(k, ()))
            pieces = list(self.wanted.get(k, ()))
            if k in self.pending and pieces:
                self.flight.add(k, PushPull(**self._head(k), sids=pieces.pop(0), slices=run), patient=patient)
            elif k in self.pending:
                self.flight.add(k, Push(**self._head(k), slices=run))
            for sids in pieces:  # after the last piece on the same socket: the shard sees the push first
                self.flight.add(k, Pull(**c._common(k, next_clock), sids=sids), patient=patient)
        if wait:
            self.wait()
        return self.result

    def wait_for(self, names: Sequence[str]) -> None:
        """Take replies until every slice of `names` is in its result array (the others may still
        be on the way: the caller computes with these meanwhile). The stream must have been
        made with `names`."""
        missing = self.missing
        self.flight.wait(until=lambda: all(missing.get(n, 0) <= 0 for n in names))
        lacking = [n for n in names if missing.get(n, 0) > 0]
        if lacking:
            raise RuntimeError(f"the shards answered without {lacking[0]!r}'s values")

    def wait(self) -> dict[str, np.ndarray]:
        """Take every reply; the result arrays."""
        self.flight.wait()
        lacking = [n for n, count in self.missing.items() if count > 0]
        if lacking:
            raise RuntimeError(f"the shards answered without {lacking[0]!r}'s values")
        return self.result
