"""Job-wide rollback with real processes (ps/sched/checkpoints.py): under BSP on two shards with
checkpoints, one shard is killed with SIGKILL mid-job and started again from its checkpoint
folder; every shard goes back to the newest complete checkpoint, every partition resumes from
its step there, and the job ends with the parameters a fault-free run of the same job reaches
(BSP is deterministic: the same batches at the same steps from the same parameters)."""
from __future__ import annotations

import signal

import numpy as np

from tests.procs import run_psctl
from tests.test_faults import HEARTBEAT_TIMEOUT, SLOW, free_port
from tests.test_jobs import job_file, psctl_json, status, wait_until

STEPS = 400
EVERY = 40


def exported(tmp_path, addr: str, job: str) -> dict[str, np.ndarray]:
    path = tmp_path / f"{job}.npz"
    done = run_psctl("export", job, "-o", str(path), "--scheduler", addr)
    assert done.returncode == 0, done.stderr
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files if not k.startswith("__")}


def test_a_shard_killed_mid_job_rolls_the_job_back_and_it_ends_as_a_fault_free_run(procs, tmp_path):
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), "--heartbeat-timeout", HEARTBEAT_TIMEOUT)
    addr = sched.ready["addr"]
    ckpt = str(tmp_path / "ckpt")
    servers = [procs.server(k, "--scheduler", addr, "--checkpoint-dir", ckpt) for k in range(2)]
    for _ in range(2):
        procs.start("worker", "--scheduler", addr, *SLOW)
    spec = dict(workers=2, steps=STEPS, eval_every=0, target_accuracy=None, checkpoint_every=EVERY,
                consistency={"policy": "bsp"}, optimizer={"kind": "adam", "lr": 0.002})
    job = psctl_json("submit", job_file(tmp_path, "faulty.yaml", name="faulty", **spec), "--scheduler", addr)["job"]

    def past_a_checkpoint():
        body = status(addr, job)
        done = [p["steps_done"] for p in body["partitions"]]
        return body["checkpoints"] and min(done) >= body["checkpoints"][-1]["version"] + EVERY // 2
    wait_until(past_a_checkpoint, what="a complete checkpoint and steps after it")
    servers[1].signal(signal.SIGKILL)
    servers[1].wait(timeout=10)
    before = status(addr, job)
    assert before["state"] == "running" and min(p["steps_done"] for p in before["partitions"]) < STEPS
    procs.server(1, "--scheduler", addr, "--checkpoint-dir", ckpt)
    wait_until(lambda: status(addr, job)["state"] != "running", what="the job ended after the rollback")
    final = status(addr, job)
    assert final["state"] == "succeeded", (final["error"], final["result"])
    (rollback,) = final["rollbacks"]
    assert rollback["shard"] == 1 and rollback["version"] % EVERY == 0 and rollback["steps_lost"] > 0
    assert final["result"]["steps_done"] == 2 * STEPS
    assert [p["steps_done"] for p in final["result"]["partitions"]] == [STEPS, STEPS]
    # every shard ends at the same version: the job's last step
    assert [s["version"] for s in final["shard_stats"]] == [STEPS, STEPS]
    text = psctl_text("status", job, "--scheduler", addr)
    assert "rollback at " in text and f"back to version {rollback['version']}" in text
    logs = psctl_text("logs", job, "--scheduler", addr)
    assert "rolled back to the checkpoint" in logs

    # the same job without the fault, on the same cluster: the same parameters (float32 sums in
    # another order: a relative difference far below the updates' size)
    ref = psctl_json("submit", job_file(tmp_path, "clean.yaml", name="clean", **spec), "--wait",
                     "--scheduler", addr, timeout=600)
    assert ref["status"] == "succeeded"
    got, want = exported(tmp_path, addr, job), exported(tmp_path, addr, ref["job"])
    assert sorted(got) == sorted(want)
    worst = 0.0
    for name in want:
        scale = max(float(np.abs(want[name]).max()), 1e-3)
        worst = max(worst, float(np.abs(got[name] - want[name]).max()) / scale)
    print(f"rollback: {rollback}; largest difference from the fault-free run, relative: {worst:.2e}")
    assert worst < 1e-4


def psctl_text(*args: str) -> str:
    result = run_psctl(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_cancelled_job_resumes_where_its_partitions_stood_and_succeeds(procs, tmp_path):
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), "--heartbeat-timeout", HEARTBEAT_TIMEOUT)
    addr = sched.ready["addr"]
    procs.server(0, "--scheduler", addr, "--checkpoint-dir", str(tmp_path / "ckpt"))
    for _ in range(2):
        procs.start("worker", "--scheduler", addr, *SLOW)
    spec = dict(workers=2, steps=STEPS, eval_every=0, target_accuracy=None, checkpoint_every=EVERY)
    job = psctl_json("submit", job_file(tmp_path, **spec), "--scheduler", addr)["job"]
    wait_until(lambda: min(p["steps_done"] for p in status(addr, job)["partitions"]) >= 30, what="steps done")
    assert run_psctl("cancel", job, "--scheduler", addr).returncode == 0
    wait_until(lambda: run_psctl("resume", job, "--scheduler", addr).returncode == 0,
               what="the cancelled job's workers left and it resumed")
    stopped_at = [p["steps_done"] for p in status(addr, job)["partitions"]]
    assert min(stopped_at) >= 30 and max(stopped_at) < STEPS
    wait_until(lambda: status(addr, job)["state"] not in ("queued", "running"), what="the resumed job ended")
    final = status(addr, job)
    assert final["state"] == "succeeded", final["error"]
    assert [p["steps_done"] for p in final["result"]["partitions"]] == [STEPS, STEPS]
    assert final["result"]["test_accuracy"] >= 0.9
    assert final["result"]["steps_done"] == 2 * STEPS
    assert "resumed" in psctl_text("logs", job, "--scheduler", addr)
    # a succeeded job does not resume: one sentence, exit 1
    again = run_psctl("resume", job, "--scheduler", addr)
    assert again.returncode == 1 and "only a failed or cancelled job resumes" in again.stderr
    assert "Traceback" not in again.stderr


def test_a_job_checkpointed_on_two_shards_goes_on_on_three_after_the_whole_cluster_restarts(procs, tmp_path):
    """Every daemon killed; the scheduler comes back on its state dir, with three shards on the same
    checkpoint root: the job is cut onto three shards from its newest complete checkpoint and succeeds."""
    port = free_port()
    bind = f"tcp://127.0.0.1:{port}"
    state, ckpt = str(tmp_path / "s"), str(tmp_path / "ckpt")
    first = [procs.start("scheduler", "--bind", bind, "--state-dir", state, "--heartbeat-timeout", "6")]
    first += [procs.server(k, "--scheduler", bind, "--checkpoint-dir", ckpt) for k in range(2)]
    first += [procs.start("worker", "--scheduler", bind, *SLOW) for _ in range(2)]
    spec = dict(workers=2, steps=STEPS, eval_every=0, target_accuracy=None, checkpoint_every=EVERY,
                consistency={"policy": "bsp"}, optimizer={"kind": "adam", "lr": 0.002})
    job = psctl_json("submit", job_file(tmp_path, "grow.yaml", name="grow", **spec), "--scheduler", bind)["job"]
    wait_until(lambda: status(bind, job)["checkpoints"], what="a complete checkpoint")
    for proc in reversed(first):
        proc.signal(signal.SIGKILL)
        proc.wait(timeout=10)

    procs.start("scheduler", "--bind", bind, "--state-dir", state, "--heartbeat-timeout", "6")
    servers = [procs.start("server", "--bind", "tcp://127.0.0.1:0", "--shard-id", str(k), "--scheduler", bind,
                           "--checkpoint-dir", ckpt, ready=False) for k in range(3)]
    for server in servers:  # started together: the scheduler sees the three within its settling time
        server.wait_ready()
    for _ in range(2):
        procs.start("worker", "--scheduler", bind, *SLOW)
    wait_until(lambda: status(bind, job)["state"] not in ("queued", "running"), what="the job ended on three shards")
    final = status(bind, job)
    assert final["state"] == "succeeded", (final["error"], final["result"])
    assert final["shards"] == [s.ready["addr"] for s in servers]
    assert final["rollbacks"][-1]["shards"] == [2, 3]
    assert [p["steps_done"] for p in final["result"]["partitions"]] == [STEPS, STEPS]
    assert [s["version"] for s in final["shard_stats"]] == [STEPS] * 3
    assert "onto 3 shards" in psctl_text("logs", job, "--scheduler", bind)
    ref = psctl_json("submit", job_file(tmp_path, "ref.yaml", name="ref", **spec), "--wait", "--scheduler", bind,
                     timeout=600)
    assert ref["status"] == "succeeded"
    print(f"on 3 shards after the restart: {final['result']['test_accuracy']:.4f}; "
          f"without the restart: {ref['test_accuracy']:.4f}; {final['rollbacks'][-1]}")
    assert abs(final["result"]["test_accuracy"] - ref["test_accuracy"]) <= 0.01

