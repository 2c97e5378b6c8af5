"""Faults with real processes: kill -9 a worker, a shard, the scheduler; the work goes on."""
from __future__ import annotations

import signal
import socket

import numpy as np
import pytest

from protocol.plan import make_plan
from tests.test_jobs import job_file, psctl_json, status, wait_until
from worker.client import ParamClient

HEARTBEAT_TIMEOUT = "2"
# Each step takes this many times its compute time: a few seconds per job.
SLOW = ("--slowdown", "10")
STEPS = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_worker_is_replaced_and_the_job_still_succeeds(procs, tmp_path):
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), "--heartbeat-timeout", HEARTBEAT_TIMEOUT)
    addr = sched.ready["addr"]
    procs.server(0, "--scheduler", addr)
    # Slowed steps keep the job running for seconds, not the fraction of a
    # second it takes at full speed, so the kill lands mid-job.
    workers = [procs.start("worker", "--scheduler", addr, *SLOW) for _ in range(3)]
    spec = job_file(tmp_path, workers=2, steps=STEPS, target_accuracy=None)
    job = psctl_json("submit", spec, "--scheduler", addr)["job"]
    wait_until(lambda: (status(addr, job).get("progress") or {}).get("steps_done", 0) >= 60, what="training under way")
    before = status(addr, job)
    busy = {p["holder"] for p in before["partitions"] if p["holder"]}
    assert before["state"] == "running" and len(busy) == 2, before["state"]
    victim = next(w for w in workers if w.ready["worker"] in busy)
    spare = next(w for w in workers if w.ready["worker"] not in busy)
    victim.signal(signal.SIGKILL)
    victim.wait(timeout=10)
    assert status(addr, job)["progress"]["steps_done"] < 2 * STEPS, "the job ended before the kill: nothing was tested"
    wait_until(lambda: spare.ready["worker"] in {p["holder"] for p in status(addr, job)["partitions"]},
               what="the spare worker took over the dead worker's partition")
    wait_until(lambda: status(addr, job)["state"] == "succeeded", what="job succeeded after a worker died")
    final = status(addr, job)
    assert final["result"]["test_accuracy"] >= 0.9
    assert final["result"]["steps_done"] == 2 * STEPS
    # Each partition did every step, and the dead worker's one was finished by the spare.
    assert [p["steps_done"] for p in final["result"]["partitions"]] == [STEPS, STEPS]
    taken = [p for p in final["result"]["partitions"]
             if victim.ready["worker"] in {h["worker"] for h in p["holders"] if h["last"] > h["first"]}]
    assert len(taken) == 1 and taken[0]["holders"][-1]["worker"] == spare.ready["worker"]
    assert taken[0]["holders"][-1]["last"] == STEPS and taken[0]["examples"] == STEPS * 32


@pytest.mark.parametrize("policy", ["asp", "bsp"])
def test_killed_shard_restarted_elsewhere_is_followed_and_the_job_succeeds(procs, tmp_path, policy):
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), "--heartbeat-timeout", HEARTBEAT_TIMEOUT)
    addr = sched.ready["addr"]
    ckpt = str(tmp_path / "ckpt")
    first = procs.server(0, "--scheduler", addr, "--checkpoint-dir", ckpt)
    for _ in range(2):
        procs.start("worker", "--scheduler", addr, *SLOW)
    spec = job_file(tmp_path, workers=2, steps=STEPS, target_accuracy=None, checkpoint_every=20,
                    consistency={"policy": policy})
    job = psctl_json("submit", spec, "--scheduler", addr)["job"]
    wait_until(lambda: (status(addr, job).get("progress") or {}).get("steps_done", 0) >= 60, what="training under way")
    first.signal(signal.SIGKILL)
    first.wait(timeout=10)
    before = status(addr, job)
    assert before["state"] == "running" and before["progress"]["steps_done"] < 2 * STEPS, "nothing left to recover"
    # The same shard id from its checkpoints, on another port (as a rescheduled pod gets another address).
    second = procs.server(0, "--scheduler", addr, "--checkpoint-dir", ckpt)
    assert second.ready["addr"] != first.ready["addr"]
    wait_until(lambda: status(addr, job)["state"] != "running", what="the job ended after its shard moved")
    final = status(addr, job)
    assert final["state"] == "succeeded", final["result"]
    assert final["shards"] == [second.ready["addr"]]
    assert final["result"]["steps_done"] == 2 * STEPS and final["result"]["test_accuracy"] >= 0.9


def test_restarted_shard_restores_its_latest_checkpoint(procs, tmp_path):
    ckpt = tmp_path / "ckpt"
    first = procs.server(0, "--checkpoint-dir", str(ckpt))
    plan = make_plan({"w": ((1000,), "float32")}, 1, 1 << 20)
    with ParamClient([first.ready["addr"]], plan, job="ck", worker="w0", timeout_s=10) as client:
        client.create({"w": np.zeros(1000, np.float32)}, optimizer={"kind": "sgd", "lr": 1.0}, checkpoint_every=5)
        for step in range(12):
            client.push({"w": np.ones(1000, np.float32)}, clock=step)
        assert client.stats()[0]["jobs"]["ck"]["version"] == 12
    files = sorted(p.name for p in (ckpt / "shard-0" / "ck").iterdir())
    assert files == ["ckpt-000000000005.npz", "ckpt-000000000010.npz"]
    # a half-written checkpoint, as a crash mid-write would leave it, must never be loaded
    (ckpt / "shard-0" / "ck" / ".tmp-999-ckpt-000000000099.npz").write_bytes(b"PK\x03\x04 truncated")
    first.signal(signal.SIGKILL)
    first.wait(timeout=10)
    second = procs.server(0, "--checkpoint-dir", str(ckpt))
    with ParamClient([second.ready["addr"]], plan, job="ck", worker="w1", timeout_s=10) as client:
        np.testing.assert_array_equal(client.pull()["w"], np.full(1000, -10.0, np.float32))
        table = client.stats()[0]["jobs"]["ck"]
        assert table["version"] == 10 and table["clocks"] == {"w0": 10}


def test_scheduler_killed_mid_job_comes_back_and_the_job_finishes(procs, tmp_path):
    port = free_port()
    bind = f"tcp://127.0.0.1:{port}"
    state = str(tmp_path / "s")
    first = procs.start("scheduler", "--bind", bind, "--state-dir", state, "--heartbeat-timeout", HEARTBEAT_TIMEOUT)
    procs.server(0, "--scheduler", bind)
    for _ in range(2):
        procs.start("worker", "--scheduler", bind, *SLOW)
    job = psctl_json("submit", job_file(tmp_path, workers=2, steps=STEPS), "--scheduler", bind)["job"]
    wait_until(lambda: (status(bind, job).get("progress") or {}).get("steps_done", 0) >= 60, what="training under way")
    before = status(bind, job)
    first.signal(signal.SIGKILL)
    first.wait(timeout=10)
    assert before["state"] == "running" and before["progress"]["steps_done"] < 2 * STEPS, "nothing left to recover"
    procs.start("scheduler", "--bind", bind, "--state-dir", state, "--heartbeat-timeout", HEARTBEAT_TIMEOUT)
    wait_until(lambda: status(bind, job)["state"] == "succeeded", what="job finished under the new scheduler")
    result = status(bind, job)["result"]
    assert result["test_accuracy"] >= 0.9 and result["steps_done"] == 2 * STEPS
    assert [p["steps_done"] for p in result["partitions"]] == [STEPS, STEPS]
