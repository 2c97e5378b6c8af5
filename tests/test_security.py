"""CURVE on every socket, through real processes on loopback (README.md, "Security").

One cluster for the module: keys for all four roles made with `psctl keys
generate`, a scheduler, two shards and two workers, every one of them
started with --curve-dir. On it:

- a job submitted with the admin key (through PSCLUSTER_CURVE_DIR) runs to
  success and `psctl export` with that key reads its parameters;
- a client without CURVE, and one whose key is not in the folder, get no
  answer at all, from the scheduler or a shard, and change nothing;
- a worker's key is refused (`forbidden`) every op that is not a worker's,
  and every worker op in a name its key does not own or for a job it has
  no part in, while a job that runs meanwhile still succeeds.

The raw clients here are plain DEALER sockets given CURVE keys by hand
(tests/security_util.py), so what is checked is what the wire allows, not
what our own client happens to send.
"""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
import zmq

from protocol.codec import encode
from protocol.messages import (
    Cancel,
    Checkpoint,
    Create,
    Drop,
    Evict,
    Export,
    List,
    Load,
    Membership,
    Ok,
    Pull,
    Push,
    PushPull,
    Register,
    Report,
    Shutdown,
    SliceData,
    Stats,
    Status,
    Submit,
)
from protocol.plan import Plan
from tests.procs import ProcGroup, run_psctl
from tests.security_util import (
    NO_REPLY_S,
    CurveDir,
    ask,
    assert_forbidden,
    curve_dealer,
    no_reply,
)
from tests.test_jobs import BASE_JOB, job_file, psctl_json, wait_until

JOB_WAIT_S = 90.0
# Long enough that a job the test pauses (SIGSTOP) cannot have finished before it is paused.
RUNNING_JOB_STEPS = 400


class Cluster:
    """The module's CURVE cluster: addresses, keys, processes, and an admin socket."""

    def __init__(self, keys: CurveDir, group: ProcGroup, sched, shards: list, workers: list, ctx: zmq.Context):
        self.keys, self.group, self.sched, self.shards, self.workers = keys, group, sched, shards, workers
        self.addr = sched.ready["addr"]
        self.ctx = ctx
        self.admin = curve_dealer(ctx, self.addr, keys.pair("admin"), keys.scheduler_public)
        self._shard_admin: zmq.Socket | None = None

    def psctl(self, *args, timeout: float = JOB_WAIT_S) -> dict:
        """A `psctl ... --json` command with the admin key (--curve-dir)."""
        return psctl_json(*args, "--scheduler", self.addr, "--curve-dir", str(self.keys.dir), timeout=timeout)

    def status(self, job: str = "") -> dict:
        reply = ask(self.admin, Status(job=job))
        assert isinstance(reply, Ok), reply
        return reply.body

    def export_body(self, job: str) -> dict:
        reply = ask(self.admin, Export(job=job))
        assert isinstance(reply, Ok), reply
        return reply.body

    def training(self, job: str) -> bool:
        """Whether shard 0 has applied a push of `job` (its tables are loaded): asked of the shard itself,
        which knows at once, unlike the scheduler, which learns progress from heartbeats."""
        shards = self.status(job).get("shards") or []
        if not shards:
            return False
        if self._shard_admin is None:
            self._shard_admin = curve_dealer(self.ctx, shards[0], self.keys.pair("admin"), self.keys.public("server"))
        stats = ask(self._shard_admin, Stats(job=job))
        assert isinstance(stats, Ok), stats
        return stats.body["jobs"].get(job, {}).get("version", 0) >= 1

    def alive(self) -> bool:
        return all(p.popen.poll() is None for p in [self.sched, *self.shards, *self.workers])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("curve")
    keys = CurveDir.generate(base / "keys", [("admin", None), ("server", None), ("worker", None),
                                             ("scheduler", None), ("worker", "mallory")])
    group = ProcGroup()
    ctx = zmq.Context()
    try:
        curve = ("--curve-dir", str(keys.dir))
        # A long heartbeat timeout: a test pauses both workers (SIGSTOP) for a moment.
        sched = group.start("scheduler", "--state-dir", str(base / "state"), "--heartbeat-timeout", "30", *curve)
        addr = sched.ready["addr"]
        shards = [group.server(k, "--scheduler", addr, *curve) for k in range(2)]
        workers = [group.start("worker", "--scheduler", addr, "--key-name", "worker", *curve) for _ in range(2)]
        for proc in [sched, *shards, *workers]:
            assert proc.ready.get("curve") is True, proc.ready
        c = Cluster(keys, group, sched, shards, workers, ctx)
        wait_until(lambda: len(c.status()["servers"]) == 2 and len(c.status()["workers"]) == 2, timeout=30,
                   what="two shards and two workers registered")
        yield c
    finally:
        group.reap()
        ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def finished_job(cluster, tmp_path_factory):
    """A small job submitted with the admin key through PSCLUSTER_CURVE_DIR, waited for: (summary, yaml)."""
    path = job_file(tmp_path_factory.mktemp("job"), name="secure", steps=40, eval_every=20)
    result = run_psctl("submit", path, "--scheduler", cluster.addr, "--wait", "--json", timeout=JOB_WAIT_S,
                       env={"PSCLUSTER_CURVE_DIR": str(cluster.keys.dir)})
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout), path


def poll_until(condition, timeout: float, what: str, interval_s: float = 0.02) -> None:
    """Poll a remote state with a deadline, more often than tests/test_jobs.py's wait_until (a job to catch
    while it trains)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)  # the interval between two polls of the daemons, not a wait for an event
    raise AssertionError(f"{what} not reached within {timeout}s")


def export(cluster: Cluster, job: str, out) -> dict[str, np.ndarray]:
    """`psctl export` with the admin key; the arrays it wrote."""
    result = run_psctl("export", job, "-o", str(out), "--scheduler", cluster.addr, "--curve-dir",
                       str(cluster.keys.dir), timeout=60)
    assert result.returncode == 0, result.stderr
    with np.load(out) as npz:
        return {k: npz[k].copy() for k in npz.files}


# --- 1: a job end to end with CURVE on everywhere ----------------------------------------------

def test_job_runs_with_curve_everywhere_and_exports_with_the_admin_key(cluster, finished_job, tmp_path):
    summary, _path = finished_job
    assert summary["status"] == "succeeded", summary
    assert summary["steps_done"] == summary["steps_asked"] == 2 * 40
    # the workers run under their key's name, and the partitions' holders were those workers
    ids = [w.ready["worker"] for w in cluster.workers]
    assert all(i.startswith("worker-") for i in ids), ids
    assert set(ids) <= {w["worker"] for w in cluster.status()["workers"]}
    holders = {h["worker"] for p in summary["partitions"] for h in p["holders"]}
    assert holders and holders <= set(ids), summary["partitions"]

    listed = cluster.psctl("list")["jobs"]
    assert [(j["id"], j["state"]) for j in listed] == [(summary["job"], "succeeded")]
    arrays = export(cluster, summary["job"], tmp_path / "params.npz")
    plan = Plan.from_wire(cluster.export_body(summary["job"])["plan"])
    assert sorted(arrays) == sorted(plan.names)
    for t in plan.tensors:
        assert arrays[t.name].shape == tuple(t.shape) and np.isfinite(arrays[t.name]).all()
    # the parameters were spread over both shards, and both were reached through CURVE
    assert {s.shard for s in plan.slices} == {0, 1}


# --- 2: no key, or a key not in the folder: no answer at all -----------------------------------

def test_unauthorised_clients_get_no_answer_and_change_nothing(cluster, finished_job, tmp_path):
    summary, _path = finished_job
    job = summary["job"]
    before_list = cluster.psctl("list")["jobs"]
    before = export(cluster, job, tmp_path / "before.npz")
    body = cluster.export_body(job)
    plan = Plan.from_wire(body["plan"])
    assert all(body["shard_keys"]), body  # the scheduler hands out each shard's public key

    # an admin key of another cluster's curve dir: well formed, but not in this cluster's
    rogue = CurveDir.generate(tmp_path / "other", [("admin", None), ("scheduler", None)]).pair("admin")
    clients = []                                 # (what, socket)
    for name, pair in (("plain", None), ("rogue key", rogue)):
        clients.append((f"{name} -> scheduler",
                        curve_dealer(cluster.ctx, cluster.addr, pair, cluster.keys.scheduler_public if pair else None)))
        for k, (addr, key) in enumerate(zip(body["shards"], body["shard_keys"])):
            clients.append((f"{name} -> shard {k}", curve_dealer(cluster.ctx, addr, pair, key if pair else None)))

    def gradient(k):
        return tuple(SliceData(s.sid, np.full(s.count, 1e3, s.dtype)) for s in plan.slices_on(k))

    for what, sock in clients:
        if what.endswith("scheduler"):
            requests = [Status(rid=1), List(rid=2), Submit(rid=3, spec=dict(BASE_JOB), submission_id="rogue"),
                        Cancel(rid=4, job=job), Evict(rid=5, shard=0), Shutdown(rid=6)]
        else:
            k = int(what[-1])
            requests = [Stats(rid=1), Pull(rid=2, job=job, worker="worker-x"),
                        Push(rid=3, job=job, worker="worker-x", clock=-1, slices=gradient(k)),
                        Drop(rid=4, job=job), Shutdown(rid=5)]
        for msg in requests:
            sock.send_multipart(encode(msg))
    answered = no_reply([sock for _what, sock in clients], NO_REPLY_S)
    assert not answered, f"answered: {[what for what, sock in clients if sock in answered]}"

    # a client with the admin key is answered on the very same addresses (the silence was the key's)
    for addr, key in zip(body["shards"], body["shard_keys"]):
        reply = ask(curve_dealer(cluster.ctx, addr, cluster.keys.pair("admin"), key), Stats(rid=7))
        assert isinstance(reply, Ok) and reply.rid == 7, reply
    assert cluster.alive()
    assert cluster.psctl("list")["jobs"] == before_list
    after = export(cluster, job, tmp_path / "after.npz")
    assert sorted(after) == sorted(before)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    for _what, sock in clients:
        sock.close(0)


# --- 3: a worker's key may do a worker's work, and nothing else --------------------------------

def test_a_worker_key_is_refused_what_is_not_a_workers(cluster, tmp_path):
    job = cluster.psctl("submit", job_file(tmp_path, name="busy", steps=RUNNING_JOB_STEPS, eval_every=100))["job"]
    poll_until(lambda: cluster.training(job), timeout=JOB_WAIT_S, what="the job training")
    # Pause both workers: the job is surely running (tables loaded, partitions held) while it is attacked.
    paused = [w.pid for w in cluster.workers]
    for pid in paused:
        os.kill(pid, signal.SIGSTOP)
    try:
        state = cluster.status(job)
        assert state["state"] == "running" and state["progress"]["steps_done"] < 2 * RUNNING_JOB_STEPS, state
        holders = sorted({h for p in state["partitions"] for h in [p.get("holder")] if h})
        assert holders and all(h.startswith("worker-") for h in holders), state["partitions"]
        body = cluster.export_body(job)
        plan = Plan.from_wire(body["plan"])
        refused = attack(cluster, job, plan, body, holders)
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)

    # every refusal was counted as `forbidden` where it was made
    sched_stats = ask(cluster.admin, Stats(rid=1))
    assert isinstance(sched_stats, Ok) and sched_stats.body["rejected_total"] >= refused["scheduler"]
    for k, (addr, key) in enumerate(zip(body["shards"], body["shard_keys"])):
        stats = ask(curve_dealer(cluster.ctx, addr, cluster.keys.pair("admin"), key), Stats(rid=2))
        assert isinstance(stats, Ok) and stats.body["rejected"].get("forbidden", 0) >= refused[k], stats.body

    # and the job, attacked while it ran, still succeeds
    wait_until(lambda: cluster.status(job)["state"] in ("succeeded", "failed", "cancelled"), timeout=JOB_WAIT_S,
               what="the attacked job ended")
    final = cluster.status(job)
    assert final["state"] == "succeeded", final.get("error")
    assert final["progress"]["steps_done"] == 2 * RUNNING_JOB_STEPS
    assert cluster.alive()


def attack(cluster: Cluster, job: str, plan: Plan, body: dict, holders: list[str]) -> dict:
    """Every request a worker's key must be refused, with the answer each got; counts by daemon."""
    keys = cluster.keys
    mallory = keys.pair("worker", "mallory")       # a worker key of the cluster, holding nothing
    shared = keys.pair("worker")                   # the key the real workers use
    sched = curve_dealer(cluster.ctx, cluster.addr, mallory, keys.scheduler_public)
    counts = {"scheduler": 0}

    def refused(sock, msg, where, *codes):
        assert_forbidden(ask(sock, msg), msg, *codes)
        counts[where] = counts.get(where, 0) + 1

    refused(sched, Cancel(rid=11, job=job), "scheduler")
    refused(sched, Shutdown(rid=12), "scheduler")
    refused(sched, Submit(rid=13, spec=dict(BASE_JOB), submission_id="by-a-worker"), "scheduler")
    refused(sched, Evict(rid=14, shard=0), "scheduler")
    refused(sched, Export(rid=15, job=job), "scheduler")
    refused(sched, Register(rid=16, role="server", addr=body["shards"][0], shard=0), "scheduler")
    # reports and assigns in a worker id the key does not own (a real holder's)
    refused(sched, Report(rid=17, worker=holders[0], job=job, event="failed",
                          state={"error": "forged", "fatal": True}), "scheduler")
    refused(sched, Report(rid=18, worker=holders[0], job=job, event="stopped"), "scheduler")
    # a worker of its own name, registered, that holds nothing: its forged failure is not the job's
    ok = ask(sched, Register(rid=19, role="worker", worker="mallory-1", info={"host": "nowhere"}))
    assert isinstance(ok, Ok), ok
    refused(sched, Report(rid=20, worker="mallory-1", job=job, event="failed",
                          state={"error": "forged", "fatal": True, "parts": {"0": {"step": 10**6}}}), "scheduler")
    refused(sched, Report(rid=21, worker="mallory-1", job=job, event="done",
                          state={"parts": {"0": {"from": 0, "step": 10**6}}}), "scheduler")
    refused(sched, Report(rid=22, worker="mallory-1", job=job, event="final", state={"test_accuracy": 1.0}),
            "scheduler")
    # users' read-only ops are any key's
    assert isinstance(ask(sched, Status(rid=23, job=job)), Ok)

    for k, (addr, key) in enumerate(zip(body["shards"], body["shard_keys"])):
        held = plan.slices_on(k)
        sids = [s.sid for s in held]
        grads = tuple(SliceData(s.sid, np.full(s.count, 1e6, s.dtype)) for s in held)
        shard = curve_dealer(cluster.ctx, addr, mallory, key)
        own = curve_dealer(cluster.ctx, addr, shared, key)
        refused(shard, Shutdown(rid=31), k)
        refused(shard, Drop(rid=32, job=job), k)
        refused(shard, Checkpoint(rid=33, job=job), k)
        refused(shard, Membership(rid=34, job=job, epoch=2**62, workers={"p0": 0, "p1": 0},
                                  holders={"p0": "mallory-1", "p1": "mallory-1"}, readers=["mallory-1"]), k)
        refused(shard, Create(rid=35, job=job + "-x", plan=body["plan"]), k)
        # a push in a real holder's name, from a key that does not own it
        refused(shard, Push(rid=36, job=job, worker=holders[0], clock=0, parts=[0], slices=grads), k)
        refused(shard, PushPull(rid=37, job=job, worker=holders[0], clock=0, parts=[0], sids=sids, slices=grads), k)
        # in its own name, but it holds no partition of the job
        refused(shard, Push(rid=38, job=job, worker="mallory-1", clock=0, parts=[0], slices=grads), k)
        refused(shard, Load(rid=39, job=job, worker="mallory-1", slices=grads), k)
        refused(shard, Pull(rid=40, job=job, worker="mallory-1", sids=sids, clock=-1), k)
        refused(shard, Pull(rid=41, job=job, worker="mallory-1", sids=sids, clock=3), k)
        # the workers' own key, under an id that holds nothing of the job: no plain read either
        refused(own, Pull(rid=42, job=job, worker="worker-idle", sids=sids, clock=-1), k)
        refused(own, Push(rid=43, job=job, worker="worker-idle", clock=0, parts=[0], slices=grads), k)
        # the key's own name is not a wildcard: a longer name that merely starts with it is not its
        refused(shard, Pull(rid=44, job=job, worker="mallory2", sids=sids, clock=-1), k)
        shard.close(0)
        own.close(0)
    sched.close(0)
    return counts
