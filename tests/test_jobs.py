"""Jobs through real processes, started the way a user starts them.

A scheduler, servers and workers are `psctl` processes on loopback; the
user's side is `psctl submit/status/list/cancel/export` run as commands.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import yaml

from protocol.codec import decode, encode
from protocol.messages import Error, Stats, Submit
from tests.procs import run_psctl

WAIT_S = 120.0

BASE_JOB = {
    "name": "digits",
    "seed": 0,
    "workers": 2,
    "steps": 150,
    "eval_every": 50,
    "model": {"kind": "mlp", "hidden": [64]},
    "data": {"source": "sklearn:digits", "batch_size": 32},
    "optimizer": {"kind": "momentum", "lr": 0.02, "momentum": 0.9},
    "consistency": {"policy": "asp"},
}


def job_file(tmp_path, filename="job.yaml", **changes) -> str:
    spec = json.loads(json.dumps(BASE_JOB))
    for key, value in changes.items():
        spec[key] = value
    path = tmp_path / filename
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def start_cluster(procs, tmp_path, *, servers=1, workers=2, state="state"):
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / state))
    addr = sched.ready["addr"]
    for k in range(servers):
        procs.server(k, "--scheduler", addr)
    for _ in range(workers):
        procs.start("worker", "--scheduler", addr)
    wait_until(lambda: len(status(addr)["servers"]) == servers and len(status(addr)["workers"]) == workers)
    return addr


def psctl_json(*args, timeout=WAIT_S):
    result = run_psctl(*args, "--json", timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def status(addr, job=None):
    return psctl_json("status", *([job] if job else []), "--scheduler", addr)


def wait_until(condition, timeout=WAIT_S, what="condition"):
    """Poll a condition on the cluster (a remote state, not a local event) with a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached within {timeout}s")


EVALUATE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from protocol.jobspec import load_job_file
    from worker.data import load_dataset
    from worker.nn.model import build_model
    from worker.trainer import evaluate
    spec = load_job_file(sys.argv[1])
    train, test = load_dataset(spec["data"], seed=spec["seed"])
    model = build_model(spec["model"], train.input_shape, train.num_classes, seed=spec["seed"])
    with np.load(sys.argv[2]) as params:
        model.load({k: params[k] for k in params.files})
    loss, acc = evaluate(model, test)
    print(json.dumps({"test_accuracy": acc, "test_loss": loss}))
""")


def evaluate_in_new_process(job_yaml, params_npz) -> dict:
    out = subprocess.run([sys.executable, "-c", EVALUATE, job_yaml, params_npz], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_lifecycle_submit_run_succeed_export(procs, tmp_path):
    addr = start_cluster(procs, tmp_path)
    path = job_file(tmp_path)
    summary = psctl_json("submit", path, "--scheduler", addr, "--wait")
    assert summary["status"] == "succeeded", summary
    assert summary["test_accuracy"] >= 0.9
    for key in ("job", "test_accuracy", "final_loss", "steps_done", "steps_asked", "examples", "train_s", "wall_s",
                "examples_per_s"):
        assert summary[key] is not None, key
    assert summary["steps_done"] == summary["steps_asked"] == 2 * 150
    assert summary["examples"] == 2 * 150 * 32 and 0 < summary["train_s"] <= summary["wall_s"]
    assert summary["examples_per_s"] == pytest.approx(summary["examples"] / summary["train_s"])
    assert [p["steps_done"] for p in summary["partitions"]] == [150, 150]
    listed = psctl_json("list", "--scheduler", addr)["jobs"]
    assert [j["id"] for j in listed] == [summary["job"]] and listed[0]["state"] == "succeeded"
    out = tmp_path / "params.npz"
    result = run_psctl("export", summary["job"], "-o", str(out), "--scheduler", addr)
    assert result.returncode == 0, result.stderr
    with np.load(out) as params:
        assert set(params.files) == {"dense0.W", "dense0.b", "dense1.W", "dense1.b"}
        assert params["dense0.W"].shape == (64, 64) and params["dense0.W"].dtype == np.float32
    # the exported parameters give the reported accuracy, evaluated elsewhere
    again = evaluate_in_new_process(path, str(out))
    assert again["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-12)


def test_two_jobs_both_finish_and_stay_apart(procs, tmp_path):
    addr = start_cluster(procs, tmp_path, servers=2, workers=2)
    first = job_file(tmp_path, "a.yaml", name="alpha", workers=1, steps=100)
    second = job_file(tmp_path, "b.yaml", name="beta", workers=1, steps=400, seed=7,
                      model={"kind": "mlp", "hidden": [32]})
    job_a = psctl_json("submit", first, "--scheduler", addr)["job"]
    job_b = psctl_json("submit", second, "--scheduler", addr)["job"]
    wait_until(lambda: status(addr, job_a)["state"] == "succeeded", what="first job succeeded")
    a_after = tmp_path / "a1.npz"
    assert run_psctl("export", job_a, "-o", str(a_after), "--scheduler", addr).returncode == 0
    wait_until(lambda: status(addr, job_b)["state"] == "succeeded", what="second job succeeded")
    a_later, b_final = tmp_path / "a2.npz", tmp_path / "b.npz"
    assert run_psctl("export", job_a, "-o", str(a_later), "--scheduler", addr).returncode == 0
    assert run_psctl("export", job_b, "-o", str(b_final), "--scheduler", addr).returncode == 0
    with np.load(a_after) as x, np.load(a_later) as y, np.load(b_final) as b:
        for name in x.files:  # job b's training never touched job a's parameters
            np.testing.assert_array_equal(x[name], y[name])
        assert b["dense0.W"].shape == (64, 32) and x["dense0.W"].shape == (64, 64)
    # each job's parameters give its own reported accuracy
    for path, npz, job in ((first, a_later, job_a), (second, b_final, job_b)):
        reported = status(addr, job)["result"]["test_accuracy"]
        assert evaluate_in_new_process(path, str(npz))["test_accuracy"] == pytest.approx(reported, abs=1e-12)
    shards = status(addr, job_b)["shards"]
    assert len(shards) == 2


def test_cancel_stops_a_running_job_and_frees_its_worker(procs, tmp_path):
    addr = start_cluster(procs, tmp_path, workers=1)
    long_job = job_file(tmp_path, "long.yaml", name="long", workers=1, steps=1_000_000)
    job = psctl_json("submit", long_job, "--scheduler", addr)["job"]
    wait_until(lambda: (status(addr, job).get("progress") or {}).get("steps_done", 0) > 5, what="long job training")
    result = run_psctl("cancel", job, "--scheduler", addr)
    assert result.returncode == 0 and "cancelled" in result.stdout
    short = job_file(tmp_path, "short.yaml", name="short", workers=1, steps=50)
    summary = psctl_json("submit", short, "--scheduler", addr, "--wait")
    assert summary["status"] == "succeeded"
    cancelled = status(addr, job)
    assert cancelled["state"] == "cancelled" and 5 < cancelled["result"]["steps_done"] < 1_000_000
    again = run_psctl("cancel", job, "--scheduler", addr)
    assert again.returncode != 0 and "already cancelled" in again.stderr and "Traceback" not in again.stderr


def test_killed_scheduler_keeps_a_queued_job_and_runs_it(procs, tmp_path):
    first = procs.start("scheduler", "--state-dir", str(tmp_path / "state"))
    addr = first.ready["addr"]
    job = psctl_json("submit", job_file(tmp_path, workers=1, steps=60), "--scheduler", addr)["job"]
    assert status(addr, job)["state"] == "queued"  # no servers, no workers: it waits
    first.signal(signal.SIGKILL)
    first.wait(timeout=10)
    second = procs.start("scheduler", "--state-dir", str(tmp_path / "state"))
    addr = second.ready["addr"]
    listed = psctl_json("list", "--scheduler", addr)["jobs"]
    assert [(j["id"], j["state"]) for j in listed] == [(job, "queued")]
    procs.server(0, "--scheduler", addr)
    procs.start("worker", "--scheduler", addr)
    wait_until(lambda: status(addr, job)["state"] == "succeeded", what="recovered job succeeded")


BAD_FILES = [
    ({"optimizer": {"kind": "adamw"}}, "optimizer.kind", "one of sgd"),
    ({"optimizer": {"kind": "sgd", "lr": -0.1}}, "optimizer.lr", "> 0"),
    ({"workers": 0}, "workers", "from 1"),
    ({"steps": "many"}, "steps", "integer"),
    ({"model": {"kind": "transformer"}}, "model.kind", "mlp, cnn"),
    ({"model": {"kind": "mlp", "hidden": [64, -3]}}, "model.hidden", "positive integers"),
    ({"model": {"kind": "mlp", "colour": "red"}}, "model.colour", "unknown field"),
    ({"data": {"source": "ftp://digits"}}, "data.source", "sklearn:digits"),
    ({"data": {"source": "synthetic:n=ten"}}, "data.source", "n"),
    ({"data": {"source": "sklearn:digits", "batch_size": 32, "micro_batches": 5}}, "data.micro_batches", "divisor"),
    ({"consistency": {"policy": "eventual"}}, "consistency.policy", "asp, bsp, ssp"),
    ({"consistency": {"policy": "ssp", "staleness": -1}}, "consistency.staleness", "from 0 to"),
    ({"target_accuracy": 1.5}, "target_accuracy", "(0, 1]"),
    ({"epochs": 2}, "steps", "exactly one of steps or epochs"),
]


def test_bad_job_files_are_refused_and_nothing_reaches_the_servers(procs, tmp_path, dealer):
    addr = start_cluster(procs, tmp_path, workers=1)
    for i, (change, field, reason) in enumerate(BAD_FILES):
        path = job_file(tmp_path, f"bad{i}.yaml", **change)
        result = run_psctl("submit", path, "--scheduler", addr)
        assert result.returncode != 0, change
        assert "Traceback" not in result.stderr
        assert field in result.stderr and reason in result.stderr, (change, result.stderr)
    # a bad spec sent straight to the scheduler, past the CLI's checks, is refused too
    sock = dealer(addr)
    sock.send_multipart(encode(Submit(rid=1, spec={**BASE_JOB, "workers": -4})))
    reply = decode(sock.recv_multipart())
    assert isinstance(reply, Error) and reply.code == "bad_spec" and "workers" in reply.message
    # YAML that does not parse, and a file that does not exist
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    for path in (str(broken), str(tmp_path / "missing.yaml")):
        result = run_psctl("submit", path, "--scheduler", addr)
        assert result.returncode != 0 and "Traceback" not in result.stderr and path in result.stderr
    assert psctl_json("list", "--scheduler", addr)["jobs"] == []
    server_addr = status(addr)["servers"][0]["addr"]
    sock = dealer(server_addr)
    sock.send_multipart(encode(Stats(rid=2)))
    assert decode(sock.recv_multipart()).body["jobs"] == {}


def test_scheduler_address_from_environment(procs, tmp_path):
    addr = procs.start("scheduler", "--state-dir", str(tmp_path / "s")).ready["addr"]
    host, port = addr[len("tcp://"):].rsplit(":", 1)
    for env in ({"PSCLUSTER_SCHEDULER": addr}, {"DMLC_PS_ROOT_URI": host, "DMLC_PS_ROOT_PORT": port}):
        result = run_psctl("list", env=env)
        assert result.returncode == 0 and "no jobs" in result.stdout, result.stderr
    result = run_psctl("list", env={"PSCLUSTER_SCHEDULER": "", "DMLC_PS_ROOT_URI": ""})
    assert result.returncode != 0 and "no scheduler address" in result.stderr


def test_failed_job_reports_its_reason(procs, tmp_path, monkeypatch):
    # the worker's data root (through the variable its process inherits) holds no such file: said plainly
    monkeypatch.setenv("PSCLUSTER_DATA_ROOTS", str(tmp_path))
    addr = start_cluster(procs, tmp_path, workers=1)
    path = job_file(tmp_path, workers=1, data={"source": f"npz:{tmp_path}/nothing.npz"})
    result = run_psctl("submit", path, "--scheduler", addr, "--wait", "--json", timeout=WAIT_S)
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["status"] == "failed" and "nothing.npz" in summary["error"]
    assert "found no such file" in summary["error"] and "outside" not in summary["error"]


def scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def metric(text: str, name: str) -> float:
    """Sum of every sample of `name` (any labels) in a Prometheus text page."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    assert seen, f"{name} not exported"
    return total


def test_every_daemon_serves_metrics(procs, tmp_path):
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), "--metrics-port", "0")
    addr = sched.ready["addr"]
    server = procs.server(0, "--scheduler", addr, "--metrics-port", "0")
    worker = procs.start("worker", "--scheduler", addr, "--metrics-port", "0")
    summary = psctl_json("submit", job_file(tmp_path, workers=1, steps=40), "--scheduler", addr, "--wait")
    assert summary["status"] == "succeeded"
    server_page = scrape(server.ready["metrics_port"])
    assert metric(server_page, "pscluster_pushes_total") == 40
    assert metric(server_page, "pscluster_bytes_received_total") > 0
    assert "pscluster_staleness_bucket" in server_page
    worker_page = scrape(worker.ready["metrics_port"])
    # Typed; its per-job series end with its part in the job (tests/test_metrics.py follows them).
    assert "# TYPE pscluster_steps_total counter" in worker_page
    sched_page = scrape(sched.ready["metrics_port"])
    assert metric(sched_page, "pscluster_jobs_submitted_total") == 1
    assert metric(sched_page, "pscluster_jobs_finished_total") == 1


def test_dmlc_launch_variables(procs, tmp_path):
    sched = procs.start("start", "--bind", "tcp://127.0.0.1:0", env={"DMLC_ROLE": "scheduler",
                                                                      "PSCLUSTER_STATE_DIR": str(tmp_path / "s")})
    host, port = sched.ready["addr"][len("tcp://"):].rsplit(":", 1)
    dmlc = {"DMLC_PS_ROOT_URI": host, "DMLC_PS_ROOT_PORT": port}
    shards = sorted(procs.start("start", "--bind", "tcp://127.0.0.1:0", env={**dmlc, "DMLC_ROLE": "server"}
                                ).ready["shard"] for _ in range(2))
    assert shards == [0, 1]  # no --shard-id: the scheduler numbered them
    procs.start("start", env={**dmlc, "DMLC_ROLE": "worker"})
    result = run_psctl("submit", job_file(tmp_path, workers=1, steps=30), "--wait", "--json", env=dmlc,
                       timeout=WAIT_S)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "succeeded"
    assert len(status(sched.ready["addr"], summary["job"])["shards"]) == 2
