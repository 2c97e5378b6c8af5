"""Export, evaluate and `--init-from` round-trip with real processes: a job's export evaluates to
the job's own test accuracy, and a job started from that file, or from the job's id, begins with
exactly those parameters (one step at a learning rate far below float32's resolution leaves them
as they were, so its final evaluation gives the same accuracy)."""
from __future__ import annotations

import json

import numpy as np

from tests.procs import run_psctl
from tests.test_jobs import job_file, psctl_json, status, wait_until

STILL = {"workers": 1, "steps": 1, "eval_every": 0, "target_accuracy": None,
         "optimizer": {"kind": "sgd", "lr": 1e-12}}


def test_export_evaluate_and_init_from_round_trip(procs, tmp_path):
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"))
    addr = sched.ready["addr"]
    procs.server(0, "--scheduler", addr)
    for _ in range(2):
        procs.start("worker", "--scheduler", addr, "--data-root", str(tmp_path))
    first = psctl_json("submit", job_file(tmp_path, "a.yaml", name="first", workers=2, steps=150), "--wait",
                       "--scheduler", addr, timeout=300)
    assert first["status"] == "succeeded"
    acc = first["test_accuracy"]
    path = tmp_path / "first.safetensors"
    assert run_psctl("export", first["job"], "-o", str(path), "--scheduler", addr).returncode == 0
    evaluated = run_psctl("evaluate", str(path), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert abs(json.loads(evaluated.stdout)["test_accuracy"] - acc) < 1e-9

    # from the file, then from the job id: the same parameters, so the same accuracy
    spec = job_file(tmp_path, "b.yaml", name="again", **STILL)
    for source in (str(path), first["job"]):
        again = psctl_json("submit", spec, "--init-from", source, "--wait", "--scheduler", addr, timeout=300)
        assert again["status"] == "succeeded", again
        assert again["test_accuracy"] == acc, (source, again["test_accuracy"], acc)
        body = status(addr, again["job"])
        assert body["spec"]["init_from"] in (f"file:{path}", f"job:{first['job']}")
        out = tmp_path / f"{again['job']}.npz"
        assert run_psctl("export", again["job"], "-o", str(out), "--scheduler", addr).returncode == 0
        with np.load(out) as got, np.load(_npz(tmp_path, addr, first)) as want:
            for name in want.files:
                np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)

    # refusals: one sentence each
    missing = run_psctl("submit", spec, "--init-from", "no-such-job-9", "--scheduler", addr)
    assert missing.returncode == 1 and "init_from: no job 'no-such-job-9'" in missing.stderr
    other = job_file(tmp_path, "c.yaml", name="wide", model={"kind": "mlp", "hidden": [32]}, **STILL)
    wrong = run_psctl("submit", other, "--init-from", str(path), "--scheduler", addr)
    assert wrong.returncode == 2 and "model" in wrong.stderr and "Traceback" not in wrong.stderr
    failed = run_psctl("submit", other, "--init-from", first["job"], "--wait", "--json", "--scheduler", addr,
                       timeout=300)
    by_id = json.loads(failed.stdout.strip().splitlines()[-1])
    assert failed.returncode == 1 and by_id["status"] == "failed" and "init_from" in by_id["error"], by_id
    wait_until(lambda: status(addr)["running"] == [], what="nothing running")


def _npz(tmp_path, addr, first) -> str:
    out = tmp_path / "first.npz"
    if not out.exists():
        assert run_psctl("export", first["job"], "-o", str(out), "--scheduler", addr).returncode == 0
    return str(out)
