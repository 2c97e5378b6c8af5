"""Consistency policies end to end: real shards, real clients, real processes.

(a) ASP never parks: clients at very different speeds (one held still)
    hammer an ASP shard with clocked push_pulls; every request is answered
    at once and the shard's parked counts stay 0. Under SSP(s) the same
    fast client is parked once it is s + 1 steps ahead of a client that
    has not pushed, and released when that one pushes.
(b) A real-process run (`psctl run JOB --json`) of each policy on
    sklearn:digits reaches the accuracy its job file asks for.
(c) `psctl status JOB --json` of a running SSP job with a straggler shows
    the shards' clock table, min/max clock, parked pulls and the staleness
    histogram.

(The policies' state machines are tested without sockets in
tests/test_policy*.py.)
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq

from protocol.codec import decode, encode
from protocol.messages import Membership, Ok
from protocol.plan import make_plan
from tests.procs import run_psctl
from worker.client import ParamClient

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"
CHILD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
SHAPE = (256,)
WAIT_S = 20.0


# ------------------------------------------------------------------ helpers

def make_table(shard, job: str, policy: dict, workers: list[str]):
    """A one-tensor table under `policy` on `shard`, with `workers` as the live membership."""
    plan = make_plan({"w": (SHAPE, "float32")}, 1)
    admin = ParamClient([shard.endpoint], plan, job=job, worker="admin", timeout_s=5)
    admin.create({"w": np.zeros(SHAPE, np.float32)}, optimizer={"kind": "sgd", "lr": 0.01}, policy=policy)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(shard.endpoint)
    try:
        sock.send_multipart(encode(Membership(rid=7, job=job, epoch=1, workers={w: 0 for w in workers})))
        assert isinstance(decode(sock.recv_multipart()), Ok)
    finally:
        sock.close(0)
    return plan, admin


def client_for(shard, plan, job: str, worker: str) -> ParamClient:
    # A held (parked) pull fails this client within max_wait_s instead of hanging the test.
    return ParamClient([shard.endpoint], plan, job=job, worker=worker, timeout_s=5, max_wait_s=WAIT_S)


class Runner(threading.Thread):
    """Runs fn(client) in a thread; keeps its exception for the test to raise."""

    def __init__(self, name: str, fn):
        super().__init__(name=name, daemon=True)
        self.fn = fn
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            self.error = exc

    def finish(self) -> None:
        self.join(WAIT_S + 10)
        assert not self.is_alive(), f"{self.name} is stuck"
        if self.error is not None:
            raise self.error


def job_stats(admin: ParamClient, job: str) -> tuple[dict, dict]:
    (shard,) = admin.stats()
    return shard, shard["jobs"][job]


GRAD = np.full(SHAPE, 0.5, np.float32)


# ------------------------------------------------------------------ (a) ASP never parks

def test_asp_answers_every_clocked_request_at_once_whatever_the_speeds(shard_factory):
    shard = shard_factory(0)
    job = "asp-never-parks"
    plan, admin = make_table(shard, job, {"policy": "asp"}, ["fast", "medium", "slow"])
    slow_may_go = threading.Event()
    slow_pushed = threading.Event()

    def fast():
        with client_for(shard, plan, job, "fast") as c:
            for t in range(40):
                c.push_pull({"w": GRAD}, clock=t)

    def medium():
        with client_for(shard, plan, job, "medium") as c:
            for t in range(10):
                c.push_pull({"w": GRAD}, clock=t)
                for _ in range(3):  # slower: extra round trips per step
                    c.pull(clock=-1)

    def slow():
        with client_for(shard, plan, job, "slow") as c:
            c.push_pull({"w": GRAD}, clock=0)
            slow_pushed.set()
            assert slow_may_go.wait(WAIT_S + 10)  # held still while the others run ahead
            c.push_pull({"w": GRAD}, clock=1)

    slow_t = Runner("slow", slow)
    slow_t.start()
    assert slow_pushed.wait(WAIT_S)
    others = [Runner("fast", fast), Runner("medium", medium)]
    for th in others:
        th.start()
    parked_seen = []
    deadline = time.monotonic() + WAIT_S
    while True:  # sample the shard while they run
        shard_body, table = job_stats(admin, job)
        parked_seen.append((shard_body["parked"], table["parked"]))
        if not any(th.is_alive() for th in others) or time.monotonic() > deadline:
            break
        others[0].join(0.005)
    for th in others:
        th.finish()
    assert parked_seen and set(parked_seen) == {(0, 0)}

    # The fast and medium clients finished while the slow one still sat at clock 1.
    shard_body, table = job_stats(admin, job)
    assert table["clocks"] == {"fast": 40, "medium": 10, "slow": 1}
    assert (table["min_clock"], table["max_clock"]) == (1, 40)
    assert table["parked"] == 0 and shard_body["parked"] == 0
    assert table["version"] == 51 and table["pushes"] == 51
    assert shard_body["duplicates"] == 0          # no request had to be re-sent

    slow_may_go.set()
    slow_t.finish()
    _, table = job_stats(admin, job)
    assert table["clocks"]["slow"] == 2 and table["parked"] == 0 and table["version"] == 52
    # The straggler's gradient, computed at version 1, was applied 50 updates late, not held.
    assert max(int(k) for k in table["staleness_hist"]) == 50
    final = admin.pull()["w"]
    np.testing.assert_allclose(final, -0.01 * 0.5 * 52 * np.ones(SHAPE), rtol=1e-5)
    admin.close()


@pytest.mark.parametrize("bound", [0, 2])
def test_ssp_parks_a_worker_bound_plus_one_steps_ahead_until_the_slowest_pushes(shard_factory, bound):
    shard = shard_factory(0)
    job = f"ssp{bound}-parks"
    plan, admin = make_table(shard, job, {"policy": "ssp", "staleness": bound}, ["fast", "slow"])

    def fast():
        with client_for(shard, plan, job, "fast") as c:
            for t in range(bound + 1):  # the last push_pull asks for step bound + 1: held
                c.push_pull({"w": GRAD}, clock=t)

    fast_t = Runner("fast", fast)
    fast_t.start()
    deadline = time.monotonic() + WAIT_S
    table = job_stats(admin, job)[1]
    while table["parked"] == 0 and fast_t.is_alive() and time.monotonic() < deadline:
        fast_t.join(0.01)
        table = job_stats(admin, job)[1]
    shard_body, table = job_stats(admin, job)
    assert fast_t.is_alive(), "the fast worker was never held"
    assert table["parked"] == 1 and shard_body["parked"] == 1
    assert table["clocks"] == {"fast": bound + 1, "slow": 0}
    assert table["max_clock"] - table["min_clock"] == bound + 1

    with client_for(shard, plan, job, "slow") as c:
        c.push_pull({"w": GRAD}, clock=0)  # the slowest reaches clock 1: the fast one may go
    fast_t.finish()
    shard_body, table = job_stats(admin, job)
    assert table["parked"] == 0 and shard_body["parked"] == 0
    assert table["clocks"] == {"fast": bound + 1, "slow": 1}
    admin.close()


# ------------------------------------------------------------------ (b) psctl run per policy

def job_file(tmp_path: Path, policy: str) -> tuple[str, float]:
    """The job file of `policy` and the accuracy it asks for."""
    if policy == "asp":
        # The make-demo job runs all its steps (no target): ask for 95% here.
        spec = yaml.safe_load((EXAMPLES / "digits-mlp.yaml").read_text())
        spec["target_accuracy"] = 0.95
        path = tmp_path / "digits-mlp-asp.yaml"
        path.write_text(yaml.safe_dump(spec))
    else:
        path = EXAMPLES / f"digits-mlp-{policy}.yaml"
        spec = yaml.safe_load(path.read_text())
    assert spec["consistency"]["policy"] == policy
    assert spec["data"]["source"] == "sklearn:digits"
    assert spec["target_accuracy"] is not None
    return str(path), float(spec["target_accuracy"])


@pytest.mark.parametrize("policy", ["asp", "bsp", "ssp"])
def test_psctl_run_of_each_policy_reaches_its_target_accuracy(tmp_path, policy):
    path, target = job_file(tmp_path, policy)
    result = run_psctl("run", path, "--json", "--quiet", timeout=180, env=CHILD_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded", summary
    assert summary["error"] == ""
    assert summary["test_accuracy"] >= target, summary


# ------------------------------------------------------------------ (c) psctl status shows the clocks

SSP_STRAGGLER_JOB = """\
name: ssp-status
seed: 0
workers: 3
steps: 5000
eval_every: 100
model: {kind: mlp, hidden: [64]}
data: {source: "sklearn:digits", batch_size: 32}
optimizer: {kind: momentum, lr: 0.02}
consistency: {policy: ssp, staleness: 2}
"""


def psctl_status(job: str, addr: str) -> dict:
    result = run_psctl("status", job, "--scheduler", addr, "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_psctl_status_shows_clocks_parked_pulls_and_staleness(procs, tmp_path):
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), env=CHILD_ENV)
    addr = sched.ready["addr"]
    procs.server(0, "--scheduler", addr, env=CHILD_ENV)
    for slowdown in ("1", "1", "8"):  # the third worker is a straggler
        procs.start("worker", "--scheduler", addr, "--slowdown", slowdown, env=CHILD_ENV)
    path = tmp_path / "job.yaml"
    path.write_text(SSP_STRAGGLER_JOB)
    submitted = run_psctl("submit", str(path), "--scheduler", addr, "--json", timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)["job"]

    # Sample until the three workers train and a fast one is seen parked
    # (the straggler is 8x slower, so the fast ones wait most of the time).
    deadline = time.monotonic() + 90
    body = psctl_status(job, addr)
    while time.monotonic() < deadline:
        stats = body.get("shard_stats") or []
        if stats and len(stats[0]["clocks"]) == 3 and stats[0]["parked"] > 0 and stats[0]["staleness_hist"]:
            break
        assert body["state"] in ("queued", "running"), body
        body = psctl_status(job, addr)
    assert body["state"] == "running", body
    (shard,) = body["shard_stats"]
    assert shard["shard"] == 0 and shard["policy"] == "ssp" and shard["staleness_bound"] == 2
    clocks = shard["clocks"]
    assert len(clocks) == 3 and all(isinstance(c, int) for c in clocks.values())
    assert (shard["min_clock"], shard["max_clock"]) == (min(clocks.values()), max(clocks.values()))
    assert shard["max_clock"] - shard["min_clock"] <= 2 + 1  # the SSP bound, as the table shows it
    assert shard["parked"] > 0
    hist = {int(k): v for k, v in shard["staleness_hist"].items()}
    assert sum(hist.values()) > 0 and all(k >= 0 and v > 0 for k, v in hist.items())
    assert body["progress"]["workers"] == 3 and body["progress"]["loss"] is not None
    assert isinstance(body["history"], list)

    cancelled = run_psctl("cancel", job, "--scheduler", addr, timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    after = psctl_status(job, addr)
    assert after["state"] == "cancelled"
    assert after["shard_stats"] and "staleness_hist" in after["shard_stats"][0]


# ------------------------------------------------------------------ (d) stragglers do not compound

def test_slowed_workers_under_bsp_keep_a_steady_pace(procs, tmp_path):
    """`--slowdown` scales a worker's own work, not the time BSP holds it at the barrier:
    two slowed workers waiting on each other must not slow down step after step."""
    from tests.test_jobs import job_file, psctl_json, status, wait_until

    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), env=CHILD_ENV)
    addr = sched.ready["addr"]
    procs.server(0, "--scheduler", addr, env=CHILD_ENV)
    for _ in range(2):
        procs.start("worker", "--scheduler", addr, "--slowdown", "10", env=CHILD_ENV)
    spec = job_file(tmp_path, workers=2, steps=150, target_accuracy=None, consistency={"policy": "bsp"})
    job = psctl_json("submit", spec, "--scheduler", addr)["job"]
    wait_until(lambda: status(addr, job)["state"] != "running", what="the BSP job of two slowed workers ended")
    final = status(addr, job)
    parts = final["result"]["partitions"]
    assert final["state"] == "succeeded" and final["result"]["steps_done"] == 150 * len(parts), final["result"]
