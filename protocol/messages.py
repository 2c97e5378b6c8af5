"""Message kinds: one frozen dataclass per op.

Every message travels as one ZeroMQ multipart message (after the routing
identity on a ROUTER socket):

    frame 0      msgpack map: v, op, rid, job, worker, clock, the kind's own
                 fields, and "s": one [slice id, dtype, count, shape] per
                 payload frame (only kinds with `slices`)
    frame 1..n   the raw bytes of one array each, C order, no header

The common fields:
    rid     request id, chosen by the requester, echoed by the reply; with
            `worker` it makes a request safe to repeat (duplicates are
            answered, not re-applied)
    job     job id the request is about ("" where none)
    worker  id of the requesting worker or client ("" where none)
    clock   the requester's clock (steps completed); -1 when not clocked
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class SliceData:
    """One payload array and the slice id it belongs to.

    On the wire it is one frame of raw bytes; its dtype, element count and
    shape travel in the header. After `decode`, `data` is a read-only view
    of the received frame (no copy).
    """

    sid: int
    data: np.ndarray

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SliceData):
            return NotImplemented
        return (
            self.sid == other.sid
            and self.data.dtype == other.data.dtype
            and self.data.shape == other.data.shape
            and bool(np.array_equal(self.data, other.data, equal_nan=self.data.dtype.kind == "f"))
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, kw_only=True)
class Message:
    """Fields every message has. Subclasses set OP and add their own."""

    OP: ClassVar[str] = ""
    # Kinds whose instances carry payload frames (a `slices` field).
    HAS_PAYLOAD: ClassVar[bool] = False

    rid: int = 0
    job: str = ""
    worker: str = ""
    clock: int = -1


# --- requests to a server shard ---------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Create(Message):
    """Create a job's table on a shard. Payload: the initial value of every
    slice this shard holds under `plan`, one frame each; or none, and the
    values come later in one `load`.

    plan: the wire form of `protocol.plan.Plan` (its inputs and digest).
    optimizer / policy: specs the shard validates (kind and knobs).
    nonlearned: tensor names updated by averaged deltas instead of the
    optimizer (BatchNorm running statistics).
    checkpoint_every: write a checkpoint each time the table's version
    crosses a multiple of this (0 = only when asked).
    init_from: a job id whose table (same plan) this shard copies the
    values of, as loaded initial values ("" = none; `init_from: job:ID`).
    """

    OP: ClassVar[str] = "create"
    HAS_PAYLOAD: ClassVar[bool] = True
    plan: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    policy: dict = field(default_factory=dict)
    nonlearned: list = field(default_factory=list, metadata={"items": str})
    checkpoint_every: int = 0
    init_from: str = ""
    slices: tuple = ()


@dataclass(frozen=True, kw_only=True)
class Load(Message):
    """The initial values of a job's table that the scheduler created without
    them. Payload: every slice this shard holds under the job's plan, one
    frame each. Accepted once, from the worker that holds the job's
    partitions while it initialises (protocol/assignment.py, `init`)."""

    OP: ClassVar[str] = "load"
    HAS_PAYLOAD: ClassVar[bool] = True
    slices: tuple = ()


@dataclass(frozen=True, kw_only=True)
class Pull(Message):
    """Ask for the current values of slices. Payload: none.

    sids: the slice ids wanted; empty means every slice this shard holds
    for the job. clock: the step the worker is about to compute (policies
    may park the pull until it is allowed); -1 reads at once.
    """

    OP: ClassVar[str] = "pull"
    sids: list = field(default_factory=list, metadata={"items": int})


@dataclass(frozen=True, kw_only=True)
class Push(Message):
    """Send gradients for step `clock`. Payload: one gradient frame per slice.

    base_version: the shard version the gradient was computed from (-1 if
    unknown), for staleness. norm: the global L2 norm of the worker's whole
    gradient over all shards (-1 if not computed), for clipping.
    parts: the data partitions this push is one step of (empty: the worker
    itself is the member, as in a job without partitions). A push for k
    partitions carries the mean of their k gradients and counts k times in
    a BSP barrier (see protocol/assignment.py).
    more: this is an early piece of a step that comes in several messages
    (each under the client's piece bound, worker/client.py): its slices are
    applied (ASP, SSP) or summed (BSP) as it arrives, and the step counts
    (clocks, barrier, version) at the piece without `more`, a Push or a
    PushPull. A piece that is sent again is not applied twice.
    coding: "" (each slice one frame, float32 or float16) or "topk" (each
    slice two frames: int32 positions and their values; see
    protocol/compression.py).
    """

    OP: ClassVar[str] = "push"
    HAS_PAYLOAD: ClassVar[bool] = True
    base_version: int = -1
    norm: float = -1.0
    parts: list = field(default_factory=list, metadata={"items": int})
    more: bool = False
    coding: str = ""
    slices: tuple = ()


@dataclass(frozen=True, kw_only=True)
class PushPull(Message):
    """Push step `clock` and pull the values for the next step, in one round
    trip. Payload: gradient frames, as in Push (and `coding` as there). The
    reply carries the slices named by `sids` (empty: every slice of the job
    on this shard)."""

    OP: ClassVar[str] = "push_pull"
    HAS_PAYLOAD: ClassVar[bool] = True
    base_version: int = -1
    norm: float = -1.0
    parts: list = field(default_factory=list, metadata={"items": int})
    sids: list = field(default_factory=list, metadata={"items": int})
    coding: str = ""
    slices: tuple = ()


@dataclass(frozen=True, kw_only=True)
class Membership(Message):
    """The members of a job's clock table for a new epoch (scheduler to shards).

    workers: member key -> clock it starts at (-1: the policy's default).
    A member is a data partition ("p0", "p1", ...: see
    protocol/assignment.py) or, in a job without partitions, a worker id.
    holders: partition key -> id of the worker that pushes for it now ("":
    nobody yet; the partition still counts in every barrier). Keys absent
    here are their own holders. readers: workers that may read the job's
    parameters without holding a partition (the one evaluating it).
    Epochs only grow; an older one is ignored.
    """

    OP: ClassVar[str] = "membership"
    epoch: int = 0
    workers: dict = field(default_factory=dict, metadata={"values": int})
    holders: dict = field(default_factory=dict, metadata={"values": str})
    readers: list = field(default_factory=list, metadata={"items": str})


@dataclass(frozen=True, kw_only=True)
class Stats(Message):
    """Ask a shard (or the scheduler) for its counters. Payload: none."""

    OP: ClassVar[str] = "stats"


@dataclass(frozen=True, kw_only=True)
class Checkpoint(Message):
    """Write a checkpoint of `job` now ("" = every job)."""

    OP: ClassVar[str] = "checkpoint"


@dataclass(frozen=True, kw_only=True)
class Restore(Message):
    """Replace `job`'s table with its complete checkpoint of `version` on this
    shard: values, optimizer state, clocks and version (a job-wide rollback
    to the same cut on every shard). Refused (bad_state, with the reason)
    when that checkpoint is missing or fails a check."""

    OP: ClassVar[str] = "restore"
    version: int = -1


@dataclass(frozen=True, kw_only=True)
class Reshard(Message):
    """Make `job`'s table on this shard under `plan` (another shard count) from the
    complete checkpoint of `version` that the shards of `old_plan` wrote under the
    checkpoint root every shard shares: each of this shard's new slices is cut out
    of the old slices it overlaps, values and optimizer state alike. Replaces the
    job's table here, if any. Refused (bad_state, with the reason) when a file
    it needs is missing or fails a check."""

    OP: ClassVar[str] = "reshard"
    version: int = -1
    plan: dict = field(default_factory=dict)
    old_plan: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Drop(Message):
    """Forget a job's table and its checkpoints (after it ended and was exported)."""

    OP: ClassVar[str] = "drop"


@dataclass(frozen=True, kw_only=True)
class Shutdown(Message):
    """Ask a daemon to exit cleanly after answering."""

    OP: ClassVar[str] = "shutdown"


# --- requests to the scheduler ----------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Register(Message):
    """A daemon announces itself to the scheduler.

    role: "server" or "worker". addr: where a server can be reached.
    shard: a server's shard id. info: free-form facts (host, pid, device).
    """

    OP: ClassVar[str] = "register"
    role: str = ""
    addr: str = ""
    shard: int = -1
    info: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    """Liveness plus progress. state: role-specific facts (a worker's step,
    loss, accuracy, examples/s, done flag; a server's jobs)."""

    OP: ClassVar[str] = "heartbeat"
    role: str = ""
    state: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Assign(Message):
    """A worker asks for work. wait_s: how long the scheduler may hold the
    request when nothing is to be done (long poll)."""

    OP: ClassVar[str] = "assign"
    wait_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Submit(Message):
    """Submit a job. spec: the job file as a map (the scheduler validates it again).

    submission_id: chosen by the submitter; a submit that repeats an id
    the scheduler has seen returns that job instead of creating another
    ("" = no id: every submit creates a job).
    """

    OP: ClassVar[str] = "submit"
    spec: dict = field(default_factory=dict)
    submission_id: str = ""


@dataclass(frozen=True, kw_only=True)
class Report(Message):
    """A worker tells the scheduler something about its assignment.

    event: "plan" (the initialising worker sends its model's tensors and
    the training set's size, and gets the job's partition plan back),
    "initialized" (tables created), "eval" (test metrics), "done" (some of
    its partitions finished their steps), "release" (it gives partitions
    back at a step boundary, as the scheduler asked), "stopped" (left
    when told to), "failed" (could not go on; state["error"] says why, and
    state["fatal"] fails the job at once, e.g. a diverged loss), "final"
    (the final evaluation). state: the facts; ps/sched/reports.py lists
    each event's fields.
    """

    OP: ClassVar[str] = "report"
    event: str = ""
    state: dict = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Status(Message):
    """Ask for one job's state (job set) or the cluster's (job empty)."""

    OP: ClassVar[str] = "status"


@dataclass(frozen=True, kw_only=True)
class Cancel(Message):
    """Cancel a queued or running job."""

    OP: ClassVar[str] = "cancel"


@dataclass(frozen=True, kw_only=True)
class Resume(Message):
    """Run a failed or cancelled job again from where its partitions stood, on its tables as the
    shards hold them or, where a shard restarted, from the job's newest complete checkpoint."""

    OP: ClassVar[str] = "resume"


@dataclass(frozen=True, kw_only=True)
class List(Message):
    """List every job the scheduler knows, newest first."""

    OP: ClassVar[str] = "list"


@dataclass(frozen=True, kw_only=True)
class Evict(Message):
    """An admin declares shard `shard` dead now: another server may take its id at once."""

    OP: ClassVar[str] = "evict"
    shard: int = -1


@dataclass(frozen=True, kw_only=True)
class Export(Message):
    """Ask where a job's parameters live: its plan and shard addresses."""

    OP: ClassVar[str] = "export"


@dataclass(frozen=True, kw_only=True)
class Logs(Message):
    """Ask for a job's events (`psctl logs`): those numbered above `after`, at most `limit` (0: the
    scheduler's page size). The answer's body: events [{seq, ts, kind, text, ...facts}], `next` (the
    `after` of the next page) and the job's `state`."""

    OP: ClassVar[str] = "logs"
    after: int = 0
    limit: int = 0


# --- replies ------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Ok(Message):
    """A successful reply. body: what the request asked for, as a map.
    Payload: slices, for replies that carry arrays (pull, push_pull)."""

    OP: ClassVar[str] = "ok"
    HAS_PAYLOAD: ClassVar[bool] = True
    body: dict = field(default_factory=dict)
    slices: tuple = ()


@dataclass(frozen=True, kw_only=True)
class Error(Message):
    """A refused request: a code from `ErrorCode` and a sentence for a person."""

    OP: ClassVar[str] = "error"
    code: str = ""
    message: str = ""
    detail: dict = field(default_factory=dict)


KINDS: dict[str, type[Message]] = {
    cls.OP: cls
    for cls in (
        Create, Load, Pull, Push, PushPull, Membership, Stats, Checkpoint, Restore, Reshard, Drop, Shutdown,
        Register, Heartbeat, Assign, Report, Submit, Status, Cancel, Resume, List, Export, Evict, Logs,
        Ok, Error,
    )
}

