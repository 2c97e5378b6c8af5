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
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.messages import Error, Ok, Stats
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
from tests.test_jobs import job_file, psctl_json, status, wait_until

SOCKETS = 4                       # DEALERs sending at once, one request in flight each
REPLY_TIMEOUT_S = 5.0             # longest wait for any one answer (a held assign is answered at the next tick)
FUZZ_DEADLINE_S = 60.0            # bound on the whole exchange
HEARTBEAT_TIMEOUT_S = 2           # the scheduler's --heartbeat-timeout: fake peers die fast
PEERS_DEAD_TIMEOUT_S = 20.0       # fake peers declared dead after the fuzz
JOB_TIMEOUT_S = 60.0              # the job, once its shard starts


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


def exchange(make_socket: Callable[[], zmq.Socket], units: list[list[Case]]) -> Outcome:
    """Send every case, up to SOCKETS at once (a unit's cases in order on one socket); judge every answer."""
    lanes = [[c for unit in units[k::SOCKETS] for c in unit] for k in range(SOCKETS)]
    socks = [make_socket() for _ in range(SOCKETS)]
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
                socks[k] = make_socket()
                del inflight[k]
    if sum(nxt) < total or inflight:
        out.broken.append(f"{total - sum(nxt)} never sent, {len(inflight)} unanswered at the deadline")
    return out


# --- the test -------------------------------------------------------------------

def only_real_peers(addr: str, worker: str) -> bool:
    """Every fake peer declared dead: the one real worker, waiting, and no server."""
    cluster = status(addr)
    workers = cluster["workers"]
    return (not cluster["servers"] and len(workers) == 1 and workers[0]["worker"] == worker
            and workers[0]["waiting"])


def test_no_input_takes_the_scheduler_down(procs, tmp_path, dealer):
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), "--heartbeat-timeout",
                        str(HEARTBEAT_TIMEOUT_S))
    addr = sched.ready["addr"]
    job = psctl_json("submit", job_file(tmp_path, workers=1, steps=60), "--scheduler", addr)["job"]
    worker = procs.start("worker", "--scheduler", addr).ready["worker"]
    wait_until(lambda: only_real_peers(addr, worker), timeout=30, what="the worker registered and idle")
    assert status(addr, job)["state"] == "queued"  # no shard: the job waits

    units = fuzz_units(Target(job=job, worker=worker, fake_ids=iter(range(1, 10**9))))
    cases = [c for unit in units for c in unit]
    kinds = Counter(c.kind for c in cases)
    assert len(cases) >= MIN_MESSAGES and set(kinds) == set(COUNTS), kinds
    assert all(sum(map(len, c.frames)) < MAX_MESSAGE_BYTES for c in cases)

    out = exchange(lambda: dealer(addr), units)
    # every message answered, with a reply that decodes and names its request; no bug hit
    assert not out.broken, (f"{len(out.broken)} of {len(cases)} messages were not answered properly:\n"
                            + "\n".join(out.broken[:30]))
    assert out.answered == len(cases)

    # alive, still serving, and nothing the fuzz sent touched the job
    assert sched.popen.poll() is None, sched.stderr()
    listed = psctl_json("list", "--scheduler", addr)["jobs"]
    assert [(j["id"], j["state"]) for j in listed] == [(job, "queued")]
    sock = dealer(addr)
    sock.send_multipart(encode(Stats(rid=9)))
    stats = decode(sock.recv_multipart())
    errors = sum(n for what, n in out.seen.items() if ": error " in what)
    assert isinstance(stats, Ok) and stats.rid == 9 and stats.body["rejected_total"] >= errors, stats

    # once every fake peer is declared dead, a real shard runs the job to the end
    wait_until(lambda: only_real_peers(addr, worker), timeout=PEERS_DEAD_TIMEOUT_S, what="fake peers declared dead")
    procs.server(0, "--scheduler", addr)
    wait_until(lambda: status(addr, job)["state"] in ("succeeded", "failed", "cancelled"), timeout=JOB_TIMEOUT_S,
               what="the job ended")
    final = status(addr, job)
    assert final["state"] == "succeeded", final.get("error")
    assert sched.popen.poll() is None
    log = open(sched.stderr_file.name, errors="replace").read()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]

    # and every malformed message was refused (the few acceptable ones accepted), with the right code
    assert not out.wrong, (f"{len(out.wrong)} of {len(cases)} answers were not the expected ones:\n"
                           + "\n".join(out.wrong[:30]) + f"\nreplies: {dict(out.seen)}")
