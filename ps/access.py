"""Who may do what on a shard, when CURVE is on (README.md, "Security").

The role comes from the key that authenticated the connection (ps/router.py
reads it off the message: `RouterDaemon.identity`), never from a field the
sender writes. The op table (`SHARD_ALLOWED`) is checked before any
handler runs; the checks here need the job's table: a worker may push and
pull only for the partitions the scheduler's membership gives it, read a
job's parameters only while it holds one of its partitions or evaluates it,
and use only worker ids its key owns. Without CURVE every check passes: the
cluster then runs on a network its operator trusts (protected mode keeps it
on loopback unless told otherwise).
"""
from __future__ import annotations

from protocol.errors import ErrorCode, ProtocolError
from protocol.keys import Identity

SCHEDULER, ADMIN, SERVER, WORKER = "scheduler", "admin", "server", "worker"

SHARD_ALLOWED: dict[str, frozenset] = {
    "create": frozenset({SCHEDULER}),
    "membership": frozenset({SCHEDULER}),
    "load": frozenset({WORKER}),
    "push": frozenset({WORKER}),
    "push_pull": frozenset({WORKER}),
    "pull": frozenset({WORKER, ADMIN}),   # an admin reads for `psctl export`
    "checkpoint": frozenset({SCHEDULER, ADMIN}),
    "restore": frozenset({SCHEDULER, ADMIN}),
    "reshard": frozenset({SCHEDULER, ADMIN}),
    "drop": frozenset({SCHEDULER, ADMIN}),
    "shutdown": frozenset({ADMIN}),
}


def _forbidden(msg, who: Identity, why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.FORBIDDEN, f"'{msg.OP}' from {who.user_id} refused: it {why}", rid=msg.rid)


def check_worker(who: Identity | None, msg) -> None:
    """A worker's request uses a worker id its key owns."""
    if who is not None and who.role == WORKER and not who.owns_worker_id(msg.worker):
        raise _forbidden(msg, who, f"names worker {msg.worker!r:.60}, which its key does not own")


def check_member(who: Identity | None, msg, table) -> None:
    """A worker's push, clocked pull or load comes from a worker the job's membership names."""
    if who is None or who.role != WORKER:
        return
    check_worker(who, msg)
    if table.policy.epoch == 0:
        raise _forbidden(msg, who, f"came before the scheduler sent job {msg.job!r}'s membership")
    if not table.policy.held_by(msg.worker):
        raise _forbidden(msg, who, f"comes from a worker that holds no partition of job {msg.job!r}")


def check_read(who: Identity | None, msg, table) -> None:
    """A plain read (clock -1): an admin, or a worker holding a partition of the job or evaluating it."""
    if who is None or who.role == ADMIN:
        return
    check_worker(who, msg)
    if not (table.policy.held_by(msg.worker) or msg.worker in table.readers):
        raise _forbidden(msg, who, f"reads job {msg.job!r} but holds none of its partitions")
