"""What goes into the scheduler's state machine, and what comes out of it.

Events in: a decoded request from a peer (`Request`), a shard's answer to
a call the machine asked for (`ShardAnswer`), and the passing of time
(`Tick`). Every event carries `now` (seconds, any monotonic origin): the
machine has no clock of its own, so tests move time by hand.

Instructions out, to be performed in order by the daemon
(ps/scheduler.py): `Persist` a job's row (before any reply that follows
it in the list: an acknowledged submit is on disk first), `Reply` to a
peer, `CallShard` (a request to a server shard whose answer comes back as
a `ShardAnswer` with the same call id), `Note` an event in a job's history
(`psctl logs`), `ReadNotes` (answer a peer with a page of that history,
which lives on disk, not in the machine), `Stop` the daemon.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from protocol.keys import Identity
from protocol.messages import Message


@dataclass(frozen=True)
class Request:
    """A decoded message from a peer; `peer` is opaque (the daemon's routing envelope)."""

    peer: object
    msg: Message
    now: float
    identity: Identity | None = None   # the CURVE key that sent it (None: CURVE off)


@dataclass(frozen=True)
class ShardAnswer:
    """The reply to CallShard `call`, or None when the shard never answered."""

    call: int
    reply: Message | None
    now: float


@dataclass(frozen=True)
class Tick:
    """Time passed: liveness, expired long polls, re-sends, progress saving."""

    now: float


@dataclass(frozen=True)
class Reply:
    """Send `msg` (an Ok or an Error) to `peer`."""

    peer: object
    msg: Message


@dataclass(frozen=True)
class CallShard:
    """Send `msg` to the shard at `addr`; its answer comes back as ShardAnswer(call)."""

    call: int
    addr: str
    msg: Message
    key: str = ""                      # the shard's CURVE public key ("": CURVE off)


@dataclass(frozen=True)
class Persist:
    """Write job `job`'s fields to the job store (`new`: insert the whole row)."""

    job: str
    fields: dict = field(default_factory=dict)
    new: bool = False


@dataclass(frozen=True)
class Note:
    """Append an event to job `job`'s history: `ts` (wall seconds), a `kind`, a sentence, its facts."""

    job: str
    ts: float
    kind: str
    text: str
    facts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ReadNotes:
    """Answer `peer` (request `rid`) with job `job`'s events numbered above `after`, at most `limit`,
    and the job's `state` (so a follower knows when the history is complete)."""

    peer: object
    rid: int
    job: str
    after: int
    limit: int
    state: str


@dataclass(frozen=True)
class Stop:
    """The daemon stops serving (after the replies before it)."""
