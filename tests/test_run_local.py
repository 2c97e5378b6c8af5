"""`psctl run`: a whole local cluster for one job, and nothing left behind.

After it returns (success, failure, or SIGINT) none of the processes it
started may still be alive: they are found by the scheduler address and
state directory in their command lines.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.procs import PSCTL, run_psctl
from worker.local_cluster import Child

# The interrupted run, from start to every process gone, on a loaded 2-core machine.
INTERRUPT_DEADLINE_S = 150.0
# From SIGINT to the exit of `psctl run`: each of its daemons gets SIGTERM, then SIGKILL after 10 s.
STOP_AFTER_SIGNAL_S = 60.0

JOB = {
    "name": "local", "seed": 1, "workers": 2, "steps": 120,
    "model": {"kind": "mlp", "hidden": [64]},
    "data": {"source": "sklearn:digits", "batch_size": 32},
    "optimizer": {"kind": "momentum", "lr": 0.02},
    "consistency": {"policy": "asp"},
}


def write_job(tmp_path, **changes) -> str:
    spec = {**JOB, **changes}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def processes_mentioning(*needles: str) -> list[tuple[int, str]]:
    """(pid, command line) of live processes whose command line contains any needle."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(n in cmd for n in needles if n):
            found.append((int(entry.name), cmd))
    return found


def scheduler_addr(stderr: str) -> str:
    m = re.search(r"scheduler (tcp://[0-9.]+:\d+)", stderr)
    assert m, stderr
    return m.group(1)


def test_run_succeeds_prints_json_and_leaves_nothing(tmp_path):
    state = tmp_path / "state"
    result = run_psctl("run", write_job(tmp_path), "--json", "--state-dir", str(state), timeout=180)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    for key in ("job", "status", "test_accuracy", "final_loss", "steps_done", "steps_asked", "examples", "train_s",
                "wall_s", "examples_per_s", "partitions"):
        assert key in summary
    assert summary["status"] == "succeeded" and summary["test_accuracy"] > 0.9
    assert summary["steps_done"] == summary["steps_asked"] == 2 * 120
    assert "loss" in result.stderr and "ex/s" in result.stderr  # the progress line
    assert processes_mentioning(str(state), scheduler_addr(result.stderr)) == []
    assert sorted(p.name for p in state.iterdir()) == ["scheduler", "scheduler.log", "server-0.log",
                                                       "worker-0.log", "worker-1.log"]


def test_run_writes_the_loss_curve(tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (pip install -e '.[test]')")
    plot = tmp_path / "loss.png"
    result = run_psctl("run", write_job(tmp_path, steps=30), "--quiet", "--plot", str(plot), timeout=180)
    assert result.returncode == 0, result.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"loss curve written to {plot}" in result.stderr


def test_run_of_a_failing_job_exits_nonzero_and_leaves_nothing(tmp_path):
    state = tmp_path / "state"
    job = write_job(tmp_path, data={"source": f"npz:{tmp_path}/absent.npz"})
    result = run_psctl("run", job, "--json", "--state-dir", str(state), "--data-root", str(tmp_path), timeout=180)
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    # --data-root reached the workers: the file is looked for inside it, and reported missing
    assert summary["status"] == "failed" and "absent.npz" in summary["error"]
    assert "found no such file" in summary["error"]
    assert processes_mentioning(str(state), scheduler_addr(result.stderr)) == []


def test_run_interrupted_stops_everything(tmp_path):
    """Ctrl-C (SIGINT to its process group, as a terminal sends it): exit 130, every process gone.

    Bounded: the start by INTERRUPT_DEADLINE_S, the clean-up after SIGINT by STOP_AFTER_SIGNAL_S.
    """
    state = tmp_path / "state"
    job = write_job(tmp_path, steps=1_000_000)
    deadline = time.monotonic() + INTERRUPT_DEADLINE_S

    def left() -> float:
        return max(0.0, deadline - time.monotonic())

    proc = Child([PSCTL, "run", job, "--state-dir", str(state)], stderr=subprocess.STDOUT, foreground=True)
    try:
        line = ""
        while "local cluster:" not in line:  # the cluster is up once this line is printed
            line = proc.readline(left())
            assert line is not None, f"no cluster within the deadline (exit={proc.popen.poll()}):\n" + \
                "\n".join(proc.lines)
        addr = scheduler_addr(line)
        assert len(processes_mentioning(addr)) == 3  # one server and two workers point at it
        proc.signal(signal.SIGINT)
        try:  # its own bound: a slow start must not leave the clean-up (what is tested) no time
            code = proc.wait(STOP_AFTER_SIGNAL_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"psctl run still running {STOP_AFTER_SIGNAL_S:g}s after SIGINT:\n" + "\n".join(proc.lines))
    finally:
        proc.stop()  # SIGTERM, then SIGKILL: bounded; its children get SIGTERM when it dies
    assert code == 130, "\n".join(proc.lines)
    assert processes_mentioning(str(state), addr) == []


def test_run_with_a_bad_file_is_one_sentence(tmp_path):
    result = run_psctl("run", str(tmp_path / "none.yaml"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "none.yaml" in result.stderr


def test_run_with_curve_secures_every_daemon(tmp_path):
    """`--curve`: fresh keys per role, every daemon announces CURVE, and a client without keys gets no answer."""
    from protocol.messages import Status
    from worker.client import CurveKeys
    from worker.local_cluster import LocalCluster
    from worker.sched_client import SchedulerClient, SchedulerUnavailable

    cluster = LocalCluster(str(tmp_path))
    try:
        keys = cluster.make_keys(str(tmp_path / "keys"))
        assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["admin", "scheduler", "server", "worker"]
        assert oct((tmp_path / "keys" / "admin" / "admin.key_secret").stat().st_mode & 0o777) == "0o600"
        addr, client = cluster.boot(1, [[]], curve_dir=keys)
        try:
            assert [child.ready["curve"] for _name, child in cluster.children] == [True, True, True]
            assert len(client.request(Status()).body["servers"]) == 1  # the admin key is let in
            assert CurveKeys.load(keys, "worker").identity.name == "worker"
            assert next(child for name, child in cluster.children if name == "worker-0").ready["worker"] \
                .startswith("worker")
            plain = SchedulerClient(addr, timeout_s=1.0, retries=0)
            with pytest.raises(SchedulerUnavailable):
                plain.request(Status())  # plaintext to a CURVE socket: no handshake, no answer
            plain.close()
        finally:
            client.close()
    finally:
        cluster.stop()


def test_psctl_run_curve_trains_to_success(tmp_path):
    state = tmp_path / "state"
    result = run_psctl("run", write_job(tmp_path, steps=40), "--curve", "--json", "--state-dir", str(state),
                       timeout=180)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "succeeded" and summary["steps_done"] == 2 * 40
    assert "(CURVE)" in result.stderr
    assert (state / "keys" / "worker" / "worker.key_secret").exists()
    assert processes_mentioning(str(state), scheduler_addr(result.stderr)) == []
