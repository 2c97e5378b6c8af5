"""Security of the daemons themselves, through real processes on loopback (README.md, "Security").

- Protected mode: a server or scheduler asked to listen beyond loopback
  without CURVE refuses to start, in one sentence naming --curve-dir and
  --insecure; with --insecure it starts and logs a warning.
- A shard under CURVE, sent a few hundred malformed or forbidden messages
  with a worker's key (and oversized plans with the scheduler's key, which
  gets past the role check), answers every one with an error, and its
  memory (VmRSS) does not move by more than 50 MB; a shard without CURVE
  does the same for a plan of 2**40 shards.
- A live shard keeps its id: a second server registering the same id at
  another address stays unregistered until an admin evicts the first.
"""
from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import zmq

from protocol.messages import (
    Checkpoint,
    Create,
    Drop,
    Error,
    Load,
    Membership,
    Message,
    Ok,
    Pull,
    Push,
    PushPull,
    Shutdown,
    SliceData,
    Stats,
    Status,
)
from protocol.plan import MAX_SLICES, MAX_TENSORS, make_plan
from ps.shard import MAX_MEMBERS, MAX_PENDING_MEMBERSHIPS
from tests.procs import run_psctl
from tests.security_util import CurveDir, ask, curve_dealer
from tests.test_jobs import psctl_json, wait_until

RSS_SLACK_BYTES = 50 << 20        # the shard's memory may move by this much, no more
SHARD_FUZZ_MESSAGES = 300         # at least this many messages in the shard fuzz
SEED = 20_261_201
JOB = "fz-1"
MEMBER = "worker-1"               # the worker (key "worker") the fuzzed job's membership names


def vm_rss(pid: int) -> int:
    """Resident memory of a process, in bytes (/proc/PID/status)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def one_sentence_error(result) -> str:
    """The error a command exited with: non-zero, one line on stderr, no traceback."""
    assert result.returncode != 0, result.stdout
    err = result.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# --- 4: protected mode ------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["server", "scheduler"])
def test_listening_beyond_loopback_needs_curve_or_insecure(procs, tmp_path, role):
    daemon = ["server", "--shard-id", "0"] if role == "server" else ["scheduler", "--state-dir", str(tmp_path / "s")]
    wide = "tcp://0.0.0.0:0"
    err = one_sentence_error(run_psctl(*daemon, "--bind", wide, timeout=60))
    assert wide in err and "--curve-dir" in err and "--insecure" in err, err
    if role == "scheduler":  # the ps-lite default bind (tcp://0.0.0.0:$DMLC_PS_ROOT_PORT) is refused alike
        err = one_sentence_error(run_psctl(*daemon, env={"DMLC_PS_ROOT_PORT": "1"}, timeout=60))
        assert "--curve-dir" in err and "--insecure" in err, err

    proc = procs.start(*daemon, "--bind", wide, "--insecure")
    assert proc.ready["addr"].startswith("tcp://0.0.0.0:") and proc.ready.get("curve") is False, proc.ready
    warnings = [line for line in proc.stderr().splitlines() if "level=warning" in line]
    assert len(warnings) == 1 and "--insecure" in warnings[0] and "addr=tcp://0.0.0.0:" in warnings[0], warnings
    assert all(line.startswith("ts=") for line in proc.stderr().splitlines()), proc.stderr()  # logfmt
    proc.stop()

    if role == "server":  # with CURVE it listens as asked, and says nothing of it
        keys = CurveDir.generate(tmp_path / "keys", [("server", None), ("scheduler", None)])
        proc = procs.start(*daemon, "--bind", wide, "--curve-dir", str(keys.dir))
        assert proc.ready.get("curve") is True and "level=warning" not in proc.stderr(), proc.stderr()
        proc.stop()


# --- 6: a shard fuzzed under CURVE, and its memory --------------------------------------------

def small_plan() -> dict:
    return make_plan({"w": ((64,), "float32"), "b": ((8,), "float32")}, 1, 4096).to_wire()


def plan_wire(tensors, num_shards=1, partition_bytes=4096, digest="0" * 16) -> dict:
    return {"tensors": tensors, "num_shards": num_shards, "partition_bytes": partition_bytes, "digest": digest}


def oversized_plans(rng: random.Random) -> list[tuple[dict, set]]:
    """Plans a shard must refuse without building them: (wire form, the codes that are right)."""
    plans = [
        plan_wire([["w", [64], "float32"]], num_shards=2**40),
        plan_wire([["w", [64], "float32"]], num_shards=2**63 - 1),
        plan_wire([["w", [64], "float32"]], num_shards=4097),
        plan_wire([["w", [64], "float32"]], num_shards=0),
        plan_wire([["w", [64], "float32"]], num_shards=-(2**40)),
        plan_wire([["w", [64], "float32"]], partition_bytes=2**40),
        plan_wire([["w", [64], "float32"]], partition_bytes=0),
        plan_wire([["w", [2**41], "float32"]]),                                  # one tensor of 2**41 elements
        plan_wire([["w", [2**20, 2**20, 2**20], "float32"]]),                    # 2**60
        plan_wire([["w", [2**21], "float32"]], partition_bytes=4),               # 2**21 slices of one element
        plan_wire([["w", [1] * 64, "float32"]]),                                 # 64 dimensions
        plan_wire([["w", [-1], "float32"]]),
        plan_wire([["n" * 5_000, [4], "float32"]]),
        plan_wire([["w", [4], "object"]]),
        plan_wire([[f"t{k}", [1], "float32"] for k in range(MAX_TENSORS + 1)]),  # one tensor too many
        plan_wire([["w", [64], "float32"]], digest="not the digest"),
        {"tensors": "w", "num_shards": 1},
        {},
    ]
    return [(p, {"bad_plan"}) for p in rng.sample(plans, len(plans))]


def shard_fuzz(rng: random.Random, sids: list[int], counts: dict[int, int]) -> list[tuple[str, Message, set]]:
    """(key, message, the error codes that are right) for the fuzz: every one must be refused."""
    cases: list[tuple[str, Message, set]] = []
    rids = iter(range(1000, 10**9))

    def add(key: str, make, want: set):
        cases.append((key, make(next(rids)), want))

    def grads(dtype="float32", extra=0, sid_list=None):
        return tuple(SliceData(s, np.ones(counts[s] + extra, dtype)) for s in (sid_list or sids))

    tiny = small_plan()
    while len(cases) < SHARD_FUZZ_MESSAGES:
        # the worker's key asks for what only the scheduler or an admin may do
        add("worker", lambda r: Create(rid=r, job=f"fz-{rng.randint(2, 99)}",
                                       plan=plan_wire([["w", [64], "float32"]], num_shards=2**40)), {"forbidden"})
        add("worker", lambda r: Create(rid=r, job=JOB, plan=tiny), {"forbidden"})
        add("worker", lambda r: Membership(rid=r, job=JOB, epoch=rng.choice([2**62, 2**48 + 1, 2]),
                                           workers={"p0": 0}, holders={"p0": "worker-evil"}), {"forbidden"})
        add("worker", lambda r: Drop(rid=r, job=rng.choice([JOB, "nojob"])), {"forbidden"})
        add("worker", lambda r: Shutdown(rid=r), {"forbidden"})
        add("worker", lambda r: Checkpoint(rid=r, job=JOB), {"forbidden"})
        # the scheduler's key gets past the role check: the plans and memberships themselves are refused
        for plan, want in oversized_plans(rng)[:rng.randint(2, 5)]:
            add("scheduler", lambda r, plan=plan: Create(rid=r, job=f"big-{r}", plan=plan), want)
        add("scheduler", lambda r: Create(rid=r, job="huge-table", plan=make_plan(
            {"w": ((2**38,), "float32")}, 1, 1 << 30).to_wire()), {"too_large"})          # 1 TiB: no allocation
        add("scheduler", lambda r: Create(rid=r, job=f"c-{r}", plan=tiny, checkpoint_every=10**12), {"bad_field"})
        add("scheduler", lambda r: Create(rid=r, job=f"o-{r}", plan=tiny, optimizer={"kind": "nope"}), {"bad_spec"})
        add("scheduler", lambda r: Create(rid=r, job=f"n-{r}", plan=tiny, nonlearned=["zz"]), {"bad_field"})
        add("scheduler", lambda r: Create(rid=r, job=JOB, plan=make_plan({"w": ((65,), "float32")}, 1).to_wire()),
            {"exists"})
        add("scheduler", lambda r: Create(rid=r, job="../../etc", plan=tiny), {"bad_field"})
        add("scheduler", lambda r: Membership(rid=r, job=rng.choice([JOB, "nojob"]),
                                              epoch=rng.choice([2**62, 2**48 + 1, 0, -5, 2**63 - 1]),
                                              workers={"p0": 0}, holders={"p0": MEMBER}), {"bad_field"})
        add("scheduler", lambda r: Membership(rid=r, job=JOB, epoch=2,
                                              workers={f"p{k}": 0 for k in range(5_000)}), {"bad_field"})
        add("scheduler", lambda r: Membership(rid=r, job=JOB, epoch=2, workers={"p0": 0},
                                              holders={f"p{k}": MEMBER for k in range(5_000)}), {"bad_field"})
        add("scheduler", lambda r: Membership(rid=r, job=JOB, epoch=2, workers={"p0": 0},
                                              readers=[f"worker-{k}" for k in range(5_000)]), {"bad_field"})
        add("scheduler", lambda r: Membership(rid=r, job=JOB, epoch=2, workers={"p0": -7}), {"bad_field"})
        add("admin", lambda r: Checkpoint(rid=r, job=JOB), {"bad_state"})   # no --checkpoint-dir
        # the job's member pushes what a push may not carry
        add("worker", lambda r: Push(rid=r, job=JOB, worker=MEMBER, clock=1, parts=[0], base_version=-5,
                                     slices=grads()), {"bad_field"})
        add("worker", lambda r: Push(rid=r, job=JOB, worker=MEMBER, clock=1, parts=[0], norm=-3.0,
                                     slices=grads()), {"bad_field"})
        add("worker", lambda r: PushPull(rid=r, job=JOB, worker=MEMBER, clock=1, parts=[0],
                                         norm=rng.choice([-3.0, -0.5, float("-inf")]), slices=grads()), {"bad_field"})
        add("worker", lambda r: Push(rid=r, job=JOB, worker=MEMBER, clock=1, parts=[rng.choice([-1, -(2**40)])],
                                     slices=grads()), {"bad_field"})
        add("worker", lambda r: Push(rid=r, job=JOB, worker=MEMBER, clock=1, parts=list(range(2_000)),
                                     slices=grads()), {"bad_field"})
        add("worker", lambda r: Push(rid=r, job=JOB, worker=MEMBER, clock=1, parts=[0],
                                     slices=grads(dtype="float64")), {"bad_dtype"})
        add("worker", lambda r: Push(rid=r, job=JOB, worker=MEMBER, clock=1, parts=[0],
                                     slices=grads(extra=rng.randint(1, 9))), {"bad_length"})
        add("worker", lambda r: Push(rid=r, job=JOB, worker=MEMBER, clock=1, parts=[0],
                                     slices=(SliceData(10**6, np.ones(4, np.float32)),)), {"unknown_slice"})
        add("worker", lambda r: PushPull(rid=r, job=JOB, worker=MEMBER, clock=1, parts=[0], sids=[10**6],
                                         slices=grads()), {"unknown_slice"})
        add("worker", lambda r: Load(rid=r, job=JOB, worker="worker-stranger", slices=grads()), {"forbidden"})
        # pushes and pulls from a worker id of this key that holds nothing, or of another key
        add("worker", lambda r: Push(rid=r, job=JOB, worker="worker-stranger", clock=1, parts=[0],
                                     slices=grads()), {"forbidden"})
        add("worker", lambda r: Pull(rid=r, job=JOB, worker="worker-stranger", sids=sids), {"forbidden"})
        add("worker", lambda r: Pull(rid=r, job=JOB, worker="admin-1", sids=sids), {"forbidden"})
        # pulls of jobs that are not there, or of slices that are not
        add("worker", lambda r: Pull(rid=r, job=rng.choice(["nojob", "fz-2", "", "x" * 100]), worker=MEMBER,
                                     clock=rng.choice([-1, 0, 5])), {"unknown_job"})
        add("admin", lambda r: Pull(rid=r, job=rng.choice(["nojob", "FZ-1"]), worker="admin"), {"unknown_job"})
        add("worker", lambda r: Pull(rid=r, job=JOB, worker=MEMBER, sids=[rng.randint(100, 2**40)]),
            {"unknown_slice"})
        add("worker", lambda r: Load(rid=r, job="nojob", worker=MEMBER, slices=grads()), {"unknown_job"})
    return cases


def test_a_curve_shard_refuses_a_fuzz_and_its_memory_stays(procs, tmp_path):
    keys = CurveDir.generate(tmp_path / "keys", [("admin", None), ("server", None), ("worker", None),
                                                 ("scheduler", None)])
    shard = procs.server(0, "--curve-dir", str(keys.dir))   # no scheduler: the test is the scheduler
    addr, server_key = shard.ready["addr"], keys.public("server")
    ctx = zmq.Context()
    try:
        socks = {role: curve_dealer(ctx, addr, keys.pair(role), server_key)
                 for role in ("admin", "worker", "scheduler")}
        # a job as the scheduler makes it: the table, its membership, then the member loads the values
        plan = small_plan()
        assert isinstance(ask(socks["scheduler"], Create(rid=1, job=JOB, plan=plan)), Ok)
        assert isinstance(ask(socks["scheduler"], Membership(rid=2, job=JOB, epoch=1, workers={"p0": 0},
                                                             holders={"p0": MEMBER})), Ok)
        held = make_plan({"w": ((64,), "float32"), "b": ((8,), "float32")}, 1, 4096).slices_on(0)
        counts = {s.sid: s.count for s in held}
        sids = sorted(counts)
        values = tuple(SliceData(s, np.arange(counts[s], dtype=np.float32)) for s in sids)
        assert isinstance(ask(socks["worker"], Load(rid=3, job=JOB, worker=MEMBER, slices=values)), Ok)
        good = Push(rid=4, job=JOB, worker=MEMBER, clock=0, parts=[0],
                    slices=tuple(SliceData(s, np.ones(counts[s], np.float32)) for s in sids))
        assert isinstance(ask(socks["worker"], good), Ok)
        before = ask(socks["worker"], Pull(rid=5, job=JOB, worker=MEMBER, sids=sids))
        assert isinstance(before, Ok), before
        rss_before = vm_rss(shard.pid)

        cases = shard_fuzz(random.Random(SEED), sids, counts)
        assert len(cases) >= SHARD_FUZZ_MESSAGES
        wrong = []
        for key, msg, want in cases:
            reply = ask(socks[key], msg)
            if not isinstance(reply, Error) or reply.code not in want or reply.rid != msg.rid:
                wrong.append(f"{key} {msg.OP} (rid {msg.rid}): expected {sorted(want)}, got "
                             f"{reply.code + ': ' + reply.message if isinstance(reply, Error) else reply}"[:400])
        rss_after = vm_rss(shard.pid)
        assert not wrong, f"{len(wrong)} of {len(cases)} answers were not the expected refusals:\n" + "\n".join(
            wrong[:30])
        assert rss_after - rss_before <= RSS_SLACK_BYTES, (rss_before, rss_after)

        # alive, and the job's table as it was: same version, same values
        after = ask(socks["worker"], Pull(rid=6, job=JOB, worker=MEMBER, sids=sids))
        assert isinstance(after, Ok) and after.body["version"] == before.body["version"], after
        for a, b in zip(after.slices, before.slices):
            np.testing.assert_array_equal(a.data, b.data)
        stats = ask(socks["admin"], Stats(rid=7))
        assert stats.body["rejected"].get("forbidden", 0) >= sum(w == {"forbidden"} for _k, _m, w in cases)
        assert "internal" not in stats.body["rejected"] and list(stats.body["jobs"]) == [JOB], stats.body
        assert shard.popen.poll() is None and "Traceback" not in shard.stderr()
    finally:
        ctx.destroy(linger=0)


def test_a_plain_shard_refuses_a_plan_of_2_to_the_40_shards(procs, ctx):
    shard = procs.server(0)
    sock = curve_dealer(ctx, shard.ready["addr"])
    rss_before = vm_rss(shard.pid)
    for rid, plan in enumerate([plan_wire([["w", [64], "float32"]], num_shards=2**40),
                                plan_wire([["w", [2**21], "float32"]], partition_bytes=4),
                                plan_wire([["w", [2**20, 2**20, 2**20], "float32"]])], start=1):
        reply = ask(sock, Create(rid=rid, job=f"big-{rid}", plan=plan))
        assert isinstance(reply, Error) and reply.code == "bad_plan", reply
    assert vm_rss(shard.pid) - rss_before <= RSS_SLACK_BYTES
    assert isinstance(ask(sock, Stats(rid=9)), Ok)


def test_a_plan_within_the_bounds_does_not_move_the_shards_memory(procs, ctx):
    """The largest plan protocol/plan.py admits (MAX_SLICES one-element slices), with a wrong
    digest, sent again and again: refused each time, and the shard's memory must not move."""
    shard = procs.server(0)
    sock = curve_dealer(ctx, shard.ready["addr"])
    elements = MAX_SLICES
    assert len(make_plan({"w": ((elements,), "float32")}, 1, 4).slices) == MAX_SLICES
    rss_before = vm_rss(shard.pid)
    for rid in range(1, 21):
        reply = ask(sock, Create(rid=rid, job="many-slices", plan=plan_wire([["w", [elements], "float32"]],
                                                                           partition_bytes=4)),
                    timeout_s=60)
        assert isinstance(reply, Error) and reply.code == "bad_plan" and "digest" in reply.message, reply
    reply = ask(sock, Create(rid=99, job="many-slices", plan=plan_wire([["w", [elements + 1], "float32"]],
                                                                      partition_bytes=4)))
    assert isinstance(reply, Error) and reply.code == "bad_plan" and "slices" in reply.message, reply
    grown = vm_rss(shard.pid) - rss_before
    assert grown <= RSS_SLACK_BYTES, f"the shard's VmRSS grew by {grown / 2**20:.0f} MiB and stayed"


def test_memberships_for_jobs_that_never_come_do_not_grow_the_shard(procs, ctx):
    """A membership for a table not created yet is held (a restarted shard hears it before the create),
    but only for MAX_PENDING_MEMBERSHIPS jobs: hundreds of full-size ones for ghost jobs cannot grow it."""
    shard = procs.server(0)
    sock = curve_dealer(ctx, shard.ready["addr"])
    ids = {f"p{k}": 0 for k in range(MAX_MEMBERS)}
    rss_before = None
    for rid in range(1, 201):
        reply = ask(sock, Membership(rid=rid, job=f"ghost-{rid}", epoch=5, workers=ids,
                                     holders={k: f"w{k}" for k in ids}, readers=list(ids)), timeout_s=30)
        assert isinstance(reply, Ok) and reply.body["pending"] is True, reply
        if rid == 2 * MAX_PENDING_MEMBERSHIPS:  # past the cap: from here on, memory must stay put
            rss_before = vm_rss(shard.pid)
    grown = vm_rss(shard.pid) - rss_before
    assert grown <= RSS_SLACK_BYTES, f"the shard's VmRSS grew by {grown / 2**20:.0f} MiB"
    assert isinstance(ask(sock, Stats(rid=999)), Ok)


# --- 7: a live shard keeps its id -----------------------------------------------------------------

def test_a_live_shards_id_is_not_taken_until_an_admin_evicts_it(procs, tmp_path, ctx):
    keys = CurveDir.generate(tmp_path / "keys", [("admin", None), ("server", None), ("scheduler", None)])
    curve = ("--curve-dir", str(keys.dir))
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), *curve)
    addr = sched.ready["addr"]
    admin = curve_dealer(ctx, addr, keys.pair("admin"), keys.scheduler_public)

    def servers():
        reply = ask(admin, Status(rid=1))
        assert isinstance(reply, Ok), reply
        return [(s["shard"], s["addr"]) for s in reply.body["servers"]]

    def refused():
        reply = ask(admin, Stats(rid=2))
        assert isinstance(reply, Ok), reply
        return reply.body["rejected_total"]

    first = procs.server(0, "--scheduler", addr, *curve)
    wait_until(lambda: servers() == [(0, first.ready["addr"])], timeout=30, what="the first shard registered")
    # READY means registered, so the second is not ready while the first holds the id
    second = procs.start("server", "--bind", "tcp://127.0.0.1:0", "--shard-id", "0", "--scheduler", addr, *curve,
                         ready=False)
    # it registers, is refused, and keeps trying (once per heartbeat); the first keeps the id
    wait_until(lambda: refused() >= 3, timeout=30, what="the second shard's registrations refused")
    assert servers() == [(0, first.ready["addr"])]
    assert psctl_json("status", "--scheduler", addr, *curve)["servers"][0]["addr"] == first.ready["addr"]
    assert "shard 0 is registered at " + first.ready["addr"] in sched.stderr()

    # the first stops answering (a machine gone, not yet declared dead); an admin evicts it
    os.kill(first.pid, signal.SIGSTOP)
    try:
        result = run_psctl("evict-shard", "0", "--scheduler", addr, *curve, timeout=60)
        assert result.returncode == 0 and first.ready["addr"] in result.stdout, result.stderr
        second.wait_ready(30)
        assert second.ready["addr"] != first.ready["addr"]
        wait_until(lambda: servers() == [(0, second.ready["addr"])], timeout=30, what="the second shard took id 0")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    # the first, back, does not take its old id from the live second one
    seen = refused()
    wait_until(lambda: refused() >= seen + 2, timeout=30, what="the first shard's registrations refused")
    assert servers() == [(0, second.ready["addr"])]
    assert first.popen.poll() is None and second.popen.poll() is None
