"""A shard's link to the scheduler: registration, heartbeats, the claim of a shard id.

The shard (ps/shard.py) serves parameters; this owns its one DEALER to the
scheduler and everything said on it, so the shard's loop only polls the
socket and calls `on_readable()` and `tick(now)`:

- `register()` announces the shard (its id, or -1 to be given one; its
  address; the jobs it holds; `restored`: the checkpoint version of each
  job it restored from disk at start). The scheduler answers with the heartbeat
  interval for servers, which the link then beats at (before that answer,
  DEFAULT_HEARTBEAT_INTERVAL_S).
- `claim(timeout_s)` registers without an id and waits, bounded, for the
  one the scheduler gives (`psctl server` without --shard-id); the shard
  calls it at startup (`Shard.start`), never while being constructed.
- `tick(now)` sends a heartbeat (Paranoid Pirate) when one is due; time is
  passed in, so tests move it by hand. A shard with checkpoints adds
  `checkpoints`: job -> the complete, valid versions it holds on disk
  (ascending, a few each: the scheduler rolls a job back only to a version
  every shard lists).
- `on_readable()` reads the scheduler's answers: a new interval is
  adopted, `reregister` (a restarted scheduler that forgot us) registers again.
  The first answer to a registration makes the link `registered` and calls
  `on_registered` (the shard becomes healthy and says READY then); until
  it comes, `tick` logs a warning naming the scheduler every
  UNREGISTERED_WARN_EVERY_S, and the beats (answered with `reregister`
  once the scheduler is there) keep registering.

Sockets come from ps/transport.py; nothing here blocks except `claim`.
"""
from __future__ import annotations

import logging
import math
import socket as pysocket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.keys import ClientKeys
from protocol.messages import Error, Heartbeat, Message, Ok, Register
from ps.transport import HEARTBEAT_SEND_HWM_MSGS, connect_dealer, drain, recv_message, send_nowait

log = logging.getLogger("pscluster.server")

# Beat this often until the scheduler's `register` answer gives the interval
# for servers (ps/sched/state.py, SERVER_HEARTBEAT_INTERVAL_S: the same value,
# so a shard whose answer is late still beats as asked).
DEFAULT_HEARTBEAT_INTERVAL_S = 0.5
# An interval from the scheduler is held to these bounds (seconds): a wrong
# value must neither make the shard spin nor fall silent.
MIN_HEARTBEAT_INTERVAL_S = 0.01
MAX_HEARTBEAT_INTERVAL_S = 60.0
# How long a server without --shard-id waits for the scheduler to give it one.
CLAIM_TIMEOUT_S = 30.0
# Longest single wait inside `claim`, so the deadline is checked often.
CLAIM_POLL_MS = 100
# Not registered yet (the scheduler silent, or refusing): a warning after this
# long, then one every UNREGISTERED_WARN_EVERY_S (seconds) while it lasts.
UNREGISTERED_WARN_AFTER_S = 2.0
UNREGISTERED_WARN_EVERY_S = 10.0


@dataclass(eq=False)
class SchedulerLink:
    """One DEALER to the scheduler; registration, heartbeats, a shard id claimed at startup.

    `jobs()` gives the shard's tables' summaries (job -> summary) for each
    heartbeat; its keys are the jobs announced at registration.
    `checkpoints()` (None: no checkpoints) gives job -> checkpoint versions
    for each heartbeat; `restored` is job -> the version restored at start,
    told at every registration.
    """

    ctx: object
    addr: str
    advertise: str
    shard: int | None
    jobs: Callable[[], dict]
    interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    keys: ClientKeys | None = None              # CURVE: this shard's pair and the scheduler's public key
    checkpoints: Callable[[], dict] | None = None
    restored: dict = field(default_factory=dict)
    max_message_bytes: int = 0                  # told at registration: workers cut their requests under it
    sock: object = None
    next_beat: float = 0.0                      # when the next beat is due; the first tick beats at once
    # This process, told apart from a restart at the same address: the scheduler
    # bars an evicted (address, instance) from its id, not the address.
    instance: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    on_registered: Callable[[], None] | None = None  # called once: the scheduler answered a registration
    registered: bool = False
    refused: str = ""                           # the scheduler's last refusal of a registration
    _last_beat: float | None = field(default=None, repr=False)
    _rid: int = field(default=0, repr=False)
    _register_rid: int = field(default=0, repr=False)
    _waiting_since: float | None = field(default=None, repr=False)
    _warned_at: float | None = field(default=None, repr=False)

    # --- socket ---

    def connect(self):
        """The DEALER to the scheduler (made on first use)."""
        if self.sock is None:
            self.sock = connect_dealer(self.ctx, self.addr, send_hwm=HEARTBEAT_SEND_HWM_MSGS, keys=self.keys)
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def _send(self, msg: Message) -> int:
        """Send `msg` with the next request id (dropped if the scheduler is away); returns the id."""
        self._rid += 1
        frames = encode(type(msg)(**{**msg.__dict__, "rid": self._rid}))
        send_nowait(self.connect(), frames)  # a full queue: the next beat or register tries again
        return self._rid

    # --- registration ---

    def register(self) -> int:
        """Announce this shard (id or -1, address, jobs held); returns the request id."""
        self._register_rid = self._send(Register(
            role="server", addr=self.advertise, shard=-1 if self.shard is None else self.shard,
            info={"host": pysocket.gethostname(), "instance": self.instance, "jobs": sorted(self.jobs()),
                  "restored": dict(self.restored), "max_message_bytes": self.max_message_bytes}))
        return self._register_rid

    def claim(self, timeout_s: float = CLAIM_TIMEOUT_S, *, clock: Callable[[], float] = time.monotonic) -> int:
        """Register without an id and wait up to `timeout_s` for the one the scheduler gives.

        Returns the id (also kept as `shard`); RuntimeError, naming the
        scheduler, if none comes in time or the scheduler refuses.
        """
        rid = self.register()
        deadline = clock() + timeout_s
        while (left := deadline - clock()) > 0:
            self._warn_unregistered(clock())
            if not self.sock.poll(max(1, min(CLAIM_POLL_MS, int(left * 1000)))):
                continue
            try:
                reply = decode(recv_message(self.sock))
            except ProtocolError:
                continue
            if reply.rid != rid:
                continue
            if isinstance(reply, Error):
                raise RuntimeError(f"the scheduler at {self.addr} refused to assign a shard id: "
                                   f"{reply.code}: {reply.message}")
            shard = reply.body.get("shard") if isinstance(reply, Ok) else None
            if type(shard) is int and shard >= 0:
                self.shard = shard
                self._adopt(reply.body)
                log.info("shard id assigned", extra={"shard": shard})
                self._registered()
                return shard
        raise RuntimeError(f"the scheduler at {self.addr} did not assign a shard id within {timeout_s:g}s")

    # --- heartbeats ---

    def tick(self, now: float) -> None:
        """Send a heartbeat if one is due at `now`."""
        if now < self.next_beat:
            return
        self._last_beat = now
        self.next_beat = now + self.interval_s
        state = {"shard": self.shard, "addr": self.advertise, "jobs": self.jobs()}
        if self.checkpoints is not None:
            state["checkpoints"] = self.checkpoints()
        self._send(Heartbeat(role="server", state=state))
        if not self.registered:
            self._warn_unregistered(now)

    def _registered(self) -> None:
        if not self.registered:
            self.registered = True
            self.refused = ""
            log.info("registered", extra={"shard": self.shard, "scheduler": self.addr, "addr": self.advertise})
            if self.on_registered is not None:
                self.on_registered()

    def _warn_unregistered(self, now: float) -> None:
        """A bounded-rate warning while the scheduler has not answered a registration."""
        if self._waiting_since is None:
            self._waiting_since = now
        if now - self._waiting_since < UNREGISTERED_WARN_AFTER_S or (
                self._warned_at is not None and now - self._warned_at < UNREGISTERED_WARN_EVERY_S):
            return
        self._warned_at = now
        extra = {"scheduler": self.addr, "waited_s": round(now - self._waiting_since, 1)}
        if self.refused:
            extra["refused"] = self.refused
        log.warning("not registered with the scheduler yet; still trying", extra=extra)

    def set_interval(self, seconds) -> bool:
        """Beat every `seconds` (held to the bounds) from the last beat on; False if it is not a number."""
        if type(seconds) not in (int, float) or not math.isfinite(seconds) or seconds <= 0:
            return False
        self.interval_s = min(MAX_HEARTBEAT_INTERVAL_S, max(MIN_HEARTBEAT_INTERVAL_S, float(seconds)))
        if self._last_beat is not None:
            self.next_beat = self._last_beat + self.interval_s
        return True

    def _adopt(self, body: dict) -> None:
        if "heartbeat_interval_s" in body and not self.set_interval(body["heartbeat_interval_s"]):
            log.warning("ignored a heartbeat interval that is not a number",
                        extra={"value": repr(body["heartbeat_interval_s"])[:40]})

    # --- answers ---

    def on_readable(self) -> None:
        """Read the scheduler's answers waiting on the socket (a bounded batch)."""
        if self.sock is not None:
            drain(self.sock, self._on_answer)

    def _on_answer(self, frames: list) -> None:
        try:
            reply = decode(frames)
        except ProtocolError:
            return
        if isinstance(reply, Error):
            if reply.rid == self._register_rid:
                self.refused = f"{reply.code}: {reply.message}"[:200]
            return
        if not isinstance(reply, Ok):
            return
        if reply.rid == self._register_rid:
            self._registered()
        self._adopt(reply.body)
        if reply.body.get("reregister"):
            self.register()
