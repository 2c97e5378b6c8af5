"""Who may ask the scheduler what, when CURVE is on (README.md, "Security").

A request's identity is the role and name of the key that authenticated its
connection (`Request.identity`, from the ZAP user id); without CURVE it is
None and everything is allowed (protected mode keeps such a cluster on
loopback). The rules:

- admin keys: submit, cancel, resume, shutdown, export, evict a shard;
- server keys: register and heartbeat as a server;
- worker keys: register, heartbeat, assign and report as a worker, under a
  worker id the key owns (its name, or its name and a dash before anything);
- any key: status, list, stats, logs.

Finer rules that need the state (a report counts only from the holder of
the partition, a shard id is not taken over while its shard is alive) are
in the handlers.
"""
from __future__ import annotations

from protocol.errors import ErrorCode, ProtocolError
from protocol.keys import Identity

ADMIN_OPS = frozenset({"submit", "cancel", "resume", "shutdown", "export", "evict"})
WORKER_OPS = frozenset({"assign", "report"})
ROLE_OPS = frozenset({"register", "heartbeat"})   # the role the message names must be the key's


def authorize(identity: Identity | None, msg) -> None:
    """Raise FORBIDDEN if the key behind `msg` may not send it."""
    if identity is None:
        return
    op = msg.OP
    if op in ADMIN_OPS:
        need = "admin"
    elif op in WORKER_OPS:
        need = "worker"
    elif op in ROLE_OPS:
        need = msg.role if msg.role in ("server", "worker") else identity.role
    else:
        return
    if identity.role != need:
        article = "an" if need == "admin" else "a"
        raise ProtocolError(ErrorCode.FORBIDDEN,
                            f"'{op}' from {identity.user_id} refused: it needs {article} {need} key", rid=msg.rid)
    if need == "worker" and not identity.owns_worker_id(msg.worker):
        raise ProtocolError(ErrorCode.FORBIDDEN, f"'{op}' from {identity.user_id} refused: worker id "
                            f"{msg.worker!r:.60} is not one its key owns", rid=msg.rid)
