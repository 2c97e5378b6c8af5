"""No input can take the scheduler down: a real-process fuzz test.

A `psctl scheduler` holds one queued job (no shard yet) and one idle
worker. A few DEALER sockets then send it thousands of malformed
messages of many kinds, made deterministically from a seeded
`random.Random`: byte garbage, headers that are not maps, wrong versions,
unknown ops, every scheduler op with wrong field types and out-of-range
values, forged registrations, heartbeats and reports, bad job specs and
submission ids, and the ops a scheduler does not serve.

It proves that every one of them is answered (within a bounded wait) with
a reply that decodes, refuses what must be refused with the expected
error code (never `internal`, which would mean a bug was hit), and echoes
the request id whenever the request's header was readable; that the
scheduler process is alive afterwards and its job still queued; and that
the job then runs to success once a shard starts: nothing the fuzz sent
changed the outcome.

Fuzz inputs are chosen so that none can legitimately change that outcome:
no `shutdown`, no valid `cancel` of the job, no valid `submit`; the only
valid server registrations name shard 7, which a job over shard 0 alone
never plans over (addresses a lax check might let through are sent with
shard ids from 2 up); fake workers ask `assign` only with a wait of zero,
once each. The test waits for every fake peer to be declared dead before
it starts the real shard.

Answers that arrive but are not the expected ones (accepted where a
refusal was due, or a different error code) are asserted last, after the
job has run, so that one run shows both.

The same test runs a second time with CURVE on (keys for every role, every
daemon and client with --curve-dir), on every third unit of the same fuzz
(every kind still there), to keep its time down. Each message goes through
a socket with the key whose role its op needs (README.md, "Security"): an
admin key for users' ops and anything that does not decode, a server key
for a server's registration and heartbeats, and for the rest a worker key
named "fz", which owns the fake workers' ids ("fz-..."). What the access
rules refuse (a worker id the key does not own, the real worker's forged
heartbeats among them, or a worker registering with no id) must then be
answered `forbidden`; everything else must get the answer it gets without
CURVE.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
import zmq.auth

from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import Error, Message, Ok, Stats
from tests.fuzz_messages import (
    ANY_ERROR,
    COUNTS,
    MAX_MESSAGE_BYTES,
    MIN_MESSAGES,
    OK,
    Case,
    Target,
)
from tests.fuzz_sched_ops import fuzz_units
from tests.test_jobs import job_file, psctl_json, wait_until

SOCKETS = 4                       # DEALERs sending at once, one request in flight each
REPLY_TIMEOUT_S = 5.0             # longest wait for any one answer (a held assign is answered at the next tick)
FUZZ_DEADLINE_S = 60.0            # bound on the whole exchange
HEARTBEAT_TIMEOUT_S = 2           # the scheduler's --heartbeat-timeout: fake peers die fast
PEERS_DEAD_TIMEOUT_S = 20.0       # fake peers declared dead after the fuzz
JOB_TIMEOUT_S = 60.0              # the job, once its shard starts
CURVE_SHARE = 3                   # the CURVE run sends every third unit
FAKE_KEY = "fz"                   # the worker key whose name the fake workers' ids ("fz-...") start with


@dataclass
class Outcome:
    """What the exchange saw: replies by kind, and what was wrong with them."""

    seen: Counter = dataclasses.field(default_factory=Counter)
    answered: int = 0
    broken: list[str] = dataclasses.field(default_factory=list)   # unanswered, undecodable, internal, wrong rid
    wrong: list[str] = dataclasses.field(default_factory=list)    # an answer, but not the right one


def judge(c: Case, frames: list[bytes], out: Outcome) -> None:
    """Check one answer; count it and note what is wrong with it."""
    out.answered += 1
    if c.frames[0] == b"":  # a REQ-style envelope: the reply comes back behind the same empty delimiter
        if not frames or frames[0] != b"":
            out.broken.append(f"the reply to a REQ-style request lacks its empty delimiter: {c.describe()}")
            return
        frames = frames[1:]
    try:
        reply = decode(frames)
    except ProtocolError as exc:
        out.broken.append(f"the reply does not decode ({exc}): {c.describe()}")
        return
    what = f"error {reply.code}" if isinstance(reply, Error) else reply.OP
    out.seen[f"{c.kind}: {what}"] += 1
    if not isinstance(reply, (Ok, Error)):
        out.broken.append(f"the reply is a {reply.OP!r}, neither ok nor error: {c.describe()}")
    elif isinstance(reply, Error) and reply.code == "internal":
        out.broken.append(f"internal error (a bug was hit): {reply.message}: {c.describe()}")
    elif reply.rid != c.rid:
        out.broken.append(f"reply rid {reply.rid}, expected {c.rid}: {c.describe()}")
    elif isinstance(reply, Ok) and OK not in c.want:
        out.wrong.append(f"accepted (ok {str(reply.body)[:200]}), expected {sorted(c.want)}: {c.describe()}")
    elif isinstance(reply, Error) and ANY_ERROR not in c.want and reply.code not in c.want:
        out.wrong.append(f"error {reply.code} ({reply.message[:200]}), expected {sorted(c.want)}: {c.describe()}")


def exchange(make_socket: Callable[..., zmq.Socket], units: list[list[Case]],
             key_of: Callable[[Case], str] | None = None) -> Outcome:
    """Send every case, up to SOCKETS at once (a unit's cases in order on one lane); judge every answer.

    With `key_of`, each case goes on its lane's socket for the key `key_of(case)` names
    (`make_socket(key)`); a lane still has one request in flight at a time.
    """
    lanes = [[c for unit in units[k::SOCKETS] for c in unit] for k in range(SOCKETS)]
    lane_socks: list[dict[str, zmq.Socket]] = [{} for _ in range(SOCKETS)]

    def sock_for(k: int, c: Case) -> zmq.Socket:
        key = key_of(c) if key_of is not None else ""
        if key not in lane_socks[k]:
            lane_socks[k][key] = make_socket(key) if key_of is not None else make_socket()
        return lane_socks[k][key]

    socks: list[zmq.Socket | None] = [None] * SOCKETS
    nxt = [0] * SOCKETS
    inflight: dict[int, tuple[Case, float]] = {}
    out = Outcome()
    total = sum(map(len, lanes))
    deadline = time.monotonic() + FUZZ_DEADLINE_S
    for _ in range(total * 4 + 1000):  # bound: each pass sends or receives at least one, or a lane times out
        for k in range(SOCKETS):
            if k not in inflight and nxt[k] < len(lanes[k]):
                c = lanes[k][nxt[k]]
                nxt[k] += 1
                socks[k] = sock_for(k, c)
                socks[k].send_multipart(c.frames)
                inflight[k] = (c, time.monotonic() + REPLY_TIMEOUT_S)
        if not inflight or time.monotonic() > deadline:
            break
        poller = zmq.Poller()
        for k in inflight:
            poller.register(socks[k], zmq.POLLIN)
        wait_ms = max(1, int(1000 * (min(d for _c, d in inflight.values()) - time.monotonic())))
        ready = dict(poller.poll(min(wait_ms, 200)))
        for k in list(inflight):
            c, due = inflight[k]
            if socks[k] in ready:
                judge(c, socks[k].recv_multipart(zmq.NOBLOCK), out)
                del inflight[k]
            elif time.monotonic() > due:
                out.broken.append(f"no answer within {REPLY_TIMEOUT_S}s: {c.describe()}")
                socks[k].close(0)  # a late answer must not be taken for the next request's
                lane_socks[k] = {key: sock for key, sock in lane_socks[k].items() if sock is not socks[k]}
                del inflight[k]
    if sum(nxt) < total or inflight:
        out.broken.append(f"{total - sum(nxt)} never sent, {len(inflight)} unanswered at the deadline")
    return out


# --- CURVE: which key sends what, and what its access rules refuse -----------------------

# The scheduler's ops and the roles they need (README.md, "Security"; the rules, restated here).
SERVED_OPS = frozenset({"register", "heartbeat", "assign", "report", "submit", "status", "cancel", "list", "export",
                        "stats", "shutdown", "evict"})
ADMIN_OPS = frozenset({"submit", "cancel", "shutdown", "export", "evict"})
WORKER_OPS = frozenset({"assign", "report"})


class CurveKeys:
    """A curve dir for the fuzz: keys of every role, worker keys "worker" (the real one's) and FAKE_KEY."""

    def __init__(self, directory: Path):
        self.dir = directory
        for role, name in [("admin", "admin"), ("server", "server"), ("scheduler", "scheduler"),
                           ("worker", "worker"), ("worker", FAKE_KEY)]:
            # pyzmq's own writer, in this process (`psctl keys generate` writes the same format;
            # tests/test_security.py makes its keys with it)
            (directory / role).mkdir(parents=True, exist_ok=True)
            zmq.auth.create_certificates(directory / role, name)
        self.scheduler = zmq.auth.load_certificate(directory / "scheduler" / "scheduler.key")[0]
        self.pairs = {role: zmq.auth.load_certificate(directory / role / f"{name}.key_secret")
                      for role, name in [("admin", "admin"), ("server", "server"), ("worker", FAKE_KEY)]}

    def dealer(self, ctx: zmq.Context, addr: str, role: str) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(REPLY_TIMEOUT_S * 1000))
        sock.setsockopt(zmq.SNDTIMEO, int(REPLY_TIMEOUT_S * 1000))
        sock.curve_publickey, sock.curve_secretkey = self.pairs[role]
        sock.curve_serverkey = self.scheduler
        sock.connect(addr)
        return sock


def decoded(c: Case) -> Message | None:
    """The message the scheduler reads from `c` (None when it does not decode), as its ROUTER splits it."""
    body = c.frames[1:] if c.frames and c.frames[0] == b"" else c.frames  # a REQ-style delimiter
    try:
        return decode(list(body))
    except ProtocolError:
        return None


def key_for(c: Case) -> str:
    """The role of the key that sends `c`: the one its op needs, admin when no rule applies."""
    msg = decoded(c)
    if msg is None or msg.OP not in WORKER_OPS | {"register", "heartbeat"}:
        return "admin"
    return "server" if getattr(msg, "role", "") == "server" else "worker"


def owns(worker: str) -> bool:
    return worker == FAKE_KEY or worker.startswith(FAKE_KEY + "-")


def curve_want(c: Case, role: str) -> frozenset[str]:
    """What is right for `c` sent with a key of `role`: `forbidden` where the access rules refuse it."""
    msg = decoded(c)
    if msg is None or msg.OP not in SERVED_OPS:  # refused before any rule: as without CURVE
        return c.want
    if msg.OP in ADMIN_OPS:
        need = "admin"
    elif msg.OP in WORKER_OPS:
        need = "worker"
    elif msg.OP in ("register", "heartbeat"):
        need = msg.role if msg.role in ("server", "worker") else role
    else:
        return c.want
    if need != role or (need == "worker" and not owns(msg.worker)):
        return frozenset({"forbidden"})
    return c.want


# --- the test -------------------------------------------------------------------

def only_real_peers(addr: str, worker: str, creds: tuple = ()) -> bool:
    """Every fake peer declared dead: the one real worker, waiting, and no server."""
    cluster = psctl_json("status", "--scheduler", addr, *creds)
    workers = cluster["workers"]
    return (not cluster["servers"] and len(workers) == 1 and workers[0]["worker"] == worker
            and workers[0]["waiting"])


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_no_input_takes_the_scheduler_down(procs, tmp_path, dealer, ctx, curve):
    keys = CurveKeys(tmp_path / "keys") if curve else None
    creds = ("--curve-dir", str(keys.dir)) if keys else ()
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), "--heartbeat-timeout",
                        str(HEARTBEAT_TIMEOUT_S), *creds)
    addr = sched.ready["addr"]

    def status(job=None):
        return psctl_json("status", *([job] if job else []), "--scheduler", addr, *creds)

    job = psctl_json("submit", job_file(tmp_path, workers=1, steps=60), "--scheduler", addr, *creds)["job"]
    worker = procs.start("worker", "--scheduler", addr, *creds, *(("--key-name", "worker") if keys else ()))
    worker = worker.ready["worker"]
    wait_until(lambda: only_real_peers(addr, worker, creds), timeout=30, what="the worker registered and idle")
    assert status(job)["state"] == "queued"  # no shard: the job waits

    units = fuzz_units(Target(job=job, worker=worker, fake_ids=iter(range(1, 10**9))))
    if keys is not None:
        units = [[dataclasses.replace(c, want=curve_want(c, key_for(c))) for c in unit]
                 for unit in units[::CURVE_SHARE]]
    cases = [c for unit in units for c in unit]
    kinds = Counter(c.kind for c in cases)
    assert len(cases) >= MIN_MESSAGES // (CURVE_SHARE if keys else 1) and set(kinds) == set(COUNTS), kinds
    assert all(sum(map(len, c.frames)) < MAX_MESSAGE_BYTES for c in cases)

    if keys is None:
        out = exchange(lambda: dealer(addr), units)
        stats_sock = dealer(addr)
    else:
        opened: list[zmq.Socket] = []

        def make_socket(role: str) -> zmq.Socket:
            opened.append(keys.dealer(ctx, addr, role))
            return opened[-1]

        out = exchange(make_socket, units, key_for)
        assert sum("forbidden" in c.want for c in cases) > 0  # the access rules were exercised
        stats_sock = make_socket("admin")
    # every message answered, with a reply that decodes and names its request; no bug hit
    assert not out.broken, (f"{len(out.broken)} of {len(cases)} messages were not answered properly:\n"
                            + "\n".join(out.broken[:30]))
    assert out.answered == len(cases)

    # alive, still serving, and nothing the fuzz sent touched the job
    assert sched.popen.poll() is None, sched.stderr()
    listed = psctl_json("list", "--scheduler", addr, *creds)["jobs"]
    assert [(j["id"], j["state"]) for j in listed] == [(job, "queued")]
    stats_sock.send_multipart(encode(Stats(rid=9)))
    stats = decode(stats_sock.recv_multipart())
    errors = sum(n for what, n in out.seen.items() if ": error " in what)
    assert isinstance(stats, Ok) and stats.rid == 9 and stats.body["rejected_total"] >= errors, stats

    # once every fake peer is declared dead, a real shard runs the job to the end
    wait_until(lambda: only_real_peers(addr, worker, creds), timeout=PEERS_DEAD_TIMEOUT_S,
               what="fake peers declared dead")
    procs.server(0, "--scheduler", addr, *creds)
    wait_until(lambda: status(job)["state"] in ("succeeded", "failed", "cancelled"), timeout=JOB_TIMEOUT_S,
               what="the job ended")
    final = status(job)
    assert final["state"] == "succeeded", final.get("error")
    assert sched.popen.poll() is None
    log = open(sched.stderr_file.name, errors="replace").read()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]

    # and every malformed message was refused (the few acceptable ones accepted), with the right code
    assert not out.wrong, (f"{len(out.wrong)} of {len(cases)} answers were not the expected ones:\n"
                           + "\n".join(out.wrong[:30]) + f"\nreplies: {dict(out.seen)}")
