"""Partitions, not workers, are the unit of work: real processes on loopback.

A BSP job of 3 data partitions on 2 shards ends with the same parameters
whatever its workers do: (a) one worker waiting at submit and two joining
while the job runs, (b) only two workers for the whole job, (c) three
workers, one killed with kill -9 mid-job and no spare. In each, every
partition reports all its steps, and the exported parameters equal those
of the same job whose three workers were all waiting at submit (float32
tolerance: only the order of the floating-point sums differs), with plain
SGD and with Adam.

Also: `epochs:` means passes over each partition's own data, as
`train-local` counts them; a diverging job fails at once and the queue
moves on; a model too large is refused at submit; a retried submit does
not make a second job.
"""
from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import yaml

from tests.procs import run_psctl
from tests.test_jobs import job_file, psctl_json, status, wait_until

STEPS = 150
PARTITIONS = 3
# Slowed compute (tens of ms a partition and step) keeps a job running for
# seconds even on a loaded machine, so joins and kills land mid-job: under BSP
# every step goes at the pace of its slowest holder.
SLOW = ("--slowdown", "100")
HEARTBEAT_TIMEOUT = "2"
# The shards take messages of at most 4 KiB: the BSP job's 2 KiB slices (a share of about 5 KB a
# shard) go in several pieces, so its steps go out layer by layer and the next forward waits per
# layer (the job's `overlap`, worker/task.py), through joins, kills and reassignments.
MESSAGE_LIMIT = "4KiB"
# Relative difference per tensor allowed between two BSP runs of one job:
# float32 sums taken in another order, over STEPS steps (measured: 1e-7 to 5e-7).
TOLERANCE = 1e-5

OPTIMIZERS = {"sgd": {"kind": "sgd", "lr": 0.1}, "adam": {"kind": "adam", "lr": 0.003}}


def bsp_job(tmp_path, optimizer: str) -> str:
    return job_file(tmp_path, f"bsp-{optimizer}.yaml", name=f"bsp-{optimizer}", workers=PARTITIONS, steps=STEPS,
                    seed=5, eval_every=100, partition_bytes=2048,
                    model={"kind": "mlp", "hidden": [32]}, data={"source": "sklearn:digits", "batch_size": 16},
                    optimizer=OPTIMIZERS[optimizer], consistency={"policy": "bsp"})


def cluster(procs, tmp_path, *, shards: int = 2, pieces: bool = False) -> str:
    """A scheduler and `shards` servers; with `pieces`, servers that take at most MESSAGE_LIMIT."""
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), "--heartbeat-timeout", HEARTBEAT_TIMEOUT)
    addr = sched.ready["addr"]
    limit = ("--max-message-bytes", MESSAGE_LIMIT) if pieces else ()
    for k in range(shards):
        procs.server(k, "--scheduler", addr, *limit)
    wait_until(lambda: len(status(addr)["servers"]) == shards, what="the shards registered")
    return addr


def workers(procs, addr: str, count: int, *extra: str) -> list:
    started = [procs.start("worker", "--scheduler", addr, *extra, ready=False) for _ in range(count)]
    for w in started:  # started together, ready one after the other
        w.wait_ready()
    ids = {w.ready["worker"] for w in started}
    wait_until(lambda: ids <= {w["worker"] for w in status(addr)["workers"]}, what="the workers registered")
    return started


def exported(addr: str, job: str, path) -> dict[str, np.ndarray]:
    result = run_psctl("export", job, "-o", str(path), "--scheduler", addr)
    assert result.returncode == 0, result.stderr
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def rel_diffs(got: dict, want: dict) -> dict[str, float]:
    assert sorted(got) == sorted(want)
    return {k: float(np.linalg.norm(got[k].astype(np.float64) - want[k]) / np.linalg.norm(want[k].astype(np.float64)))
            for k in want}


def finished(addr: str, job: str) -> dict:
    wait_until(lambda: status(addr, job)["state"] in ("succeeded", "failed", "cancelled"), what=f"{job} ended")
    body = status(addr, job)
    assert body["state"] == "succeeded", (body["state"], body.get("error"))
    parts = body["result"]["partitions"]
    assert [p["steps_done"] for p in parts] == [STEPS] * PARTITIONS, parts
    assert [p["examples"] for p in parts] == [STEPS * 16] * PARTITIONS
    assert body["result"]["steps_done"] == body["result"]["steps_asked"] == STEPS * PARTITIONS
    return body


def trained_by(part: dict) -> list[str]:
    return [h["worker"] for h in part["holders"] if h["last"] > h["first"]]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Each optimizer's job run with all three workers waiting at submit: (parameters, result)."""
    from tests.procs import ProcGroup

    out = {}
    group = ProcGroup()
    try:
        for opt in OPTIMIZERS:
            tmp = tmp_path_factory.mktemp(f"ref-{opt}")
            addr = cluster(group, tmp, pieces=True)
            workers(group, addr, PARTITIONS)
            job = psctl_json("submit", bsp_job(tmp, opt), "--scheduler", addr)["job"]
            body = finished(addr, job)
            assert all(len(trained_by(p)) == 1 for p in body["result"]["partitions"])
            out[opt] = exported(addr, job, tmp / "ref.npz")
            group.reap()
    finally:
        group.reap()
    return out


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_bsp_with_workers_joining_mid_job_equals_three_waiting_workers(procs, tmp_path, references, opt):
    addr = cluster(procs, tmp_path, pieces=True)
    workers(procs, addr, 1, *SLOW)
    job = psctl_json("submit", bsp_job(tmp_path, opt), "--scheduler", addr)["job"]
    wait_until(lambda: status(addr, job)["progress"].get("steps_done", 0) >= PARTITIONS * 5,
               what="one worker training")
    assert status(addr, job)["progress"]["workers"] == 1  # it holds all three partitions
    workers(procs, addr, 2)  # the slowed first worker sets the pace
    wait_until(lambda: status(addr, job)["progress"].get("workers") == 3 or status(addr, job)["state"] != "running",
               what="the joiners holding partitions")
    joined = status(addr, job)
    assert joined["state"] == "running", "the job ended before the joiners took partitions: nothing was tested"
    body = finished(addr, job)
    parts = body["result"]["partitions"]
    assert all(trained_by(p)[0] == trained_by(parts[0])[0] for p in parts)  # the first worker started them all
    assert len({w for p in parts for w in trained_by(p)}) == 3                # then the joiners took some
    diffs = rel_diffs(exported(addr, job, tmp_path / "p.npz"), references[opt])
    assert max(diffs.values()) < TOLERANCE, diffs


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_bsp_with_two_workers_for_three_partitions_equals_three_workers(procs, tmp_path, references, opt):
    addr = cluster(procs, tmp_path, pieces=True)
    workers(procs, addr, 2)
    job = psctl_json("submit", bsp_job(tmp_path, opt), "--scheduler", addr)["job"]
    body = finished(addr, job)
    holders = [trained_by(p) for p in body["result"]["partitions"]]
    assert all(len(h) == 1 for h in holders) and len({h[0] for h in holders}) == 2, holders
    diffs = rel_diffs(exported(addr, job, tmp_path / "p.npz"), references[opt])
    assert max(diffs.values()) < TOLERANCE, diffs


def test_bsp_without_overlap_equals_the_jobs_with_it(procs, tmp_path, references):
    """The references ran with overlap (the default, with pieces under MESSAGE_LIMIT: gradients sent
    layer by layer, the next step's forward waiting per layer); the same job with `overlap: false`
    sends after the whole backward."""
    addr = cluster(procs, tmp_path, pieces=True)
    workers(procs, addr, PARTITIONS)
    path = bsp_job(tmp_path, "sgd")
    spec = yaml.safe_load(open(path))
    spec["overlap"] = False
    with open(path, "w") as fh:
        yaml.safe_dump(spec, fh)
    job = psctl_json("submit", path, "--scheduler", addr)["job"]
    finished(addr, job)
    diffs = rel_diffs(exported(addr, job, tmp_path / "p.npz"), references["sgd"])
    assert max(diffs.values()) < TOLERANCE, diffs


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_bsp_with_a_worker_killed_and_no_spare_equals_three_workers(procs, tmp_path, references, opt):
    addr = cluster(procs, tmp_path)  # whole messages: the same result as the references' pieces
    started = workers(procs, addr, PARTITIONS, *SLOW)
    job = psctl_json("submit", bsp_job(tmp_path, opt), "--scheduler", addr)["job"]
    wait_until(lambda: status(addr, job)["progress"].get("workers") == PARTITIONS, what="three workers training")
    before = status(addr, job)
    holders = {p["holder"]: p["index"] for p in before["partitions"] if p["holder"]}
    victim = next(w for w in started if w.ready["worker"] in holders)
    victim_id, index = victim.ready["worker"], holders[victim.ready["worker"]]
    victim.signal(signal.SIGKILL)
    victim.wait(timeout=10)
    assert status(addr, job)["progress"]["steps_done"] < STEPS * PARTITIONS, "the job ended before the kill"
    body = finished(addr, job)
    taken = body["result"]["partitions"][index]
    assert trained_by(taken)[0] == victim_id and len(trained_by(taken)) == 2  # a survivor finished it
    assert trained_by(taken)[1] in {w.ready["worker"] for w in started} - {victim_id}
    diffs = rel_diffs(exported(addr, job, tmp_path / "p.npz"), references[opt])
    assert max(diffs.values()) < TOLERANCE, diffs


def test_epochs_are_passes_over_each_partitions_data_as_train_local_counts_them(procs, tmp_path):
    path = job_file(tmp_path, name="epochs", workers=2, steps=None, epochs=2, eval_every=0,
                    optimizer={"kind": "momentum", "lr": 0.05, "momentum": 0.9,
                               "schedule": {"kind": "cosine"}})
    local = json.loads(run_psctl("train-local", path, "--json", "--quiet").stdout)
    addr = cluster(procs, tmp_path, shards=1)
    workers(procs, addr, 2)
    summary = psctl_json("submit", path, "--scheduler", addr, "--wait")
    assert summary["status"] == "succeeded", summary
    train_size = 1437  # 80% of the 1,797 digits
    sizes = [len(range(k, train_size, 2)) for k in range(2)]
    owed = [2 * -(-n // 32) for n in sizes]  # 2 x ceil(examples / batch)
    assert [p["steps_done"] for p in summary["partitions"]] == [p["steps"] for p in summary["partitions"]] == owed
    assert summary["examples"] == sum(owed) * 32
    # Two passes over the training set, as train-local makes them (each pass tops its last batch up).
    assert abs(summary["examples"] - local["steps"] * 32) <= 2 * 2 * 32
    assert abs(summary["test_accuracy"] - local["test_accuracy"]) <= 0.02, (summary["test_accuracy"], local)


def test_a_diverging_job_fails_at_once_and_the_next_one_runs(procs, tmp_path):
    addr = cluster(procs, tmp_path, shards=1)
    workers(procs, addr, 2)
    bad = psctl_json("submit", job_file(tmp_path, "bad.yaml", name="diverge", optimizer={"kind": "sgd", "lr": 1e12}),
                     "--scheduler", addr)["job"]
    good = psctl_json("submit", job_file(tmp_path, "good.yaml", name="after", steps=60), "--scheduler", addr)["job"]
    wait_until(lambda: status(addr, bad)["state"] != "running" and status(addr, bad)["state"] != "queued",
               timeout=30, what="the diverging job failed within 30 s")
    failed = status(addr, bad)
    assert failed["state"] == "failed" and "diverged at step" in failed["error"], failed["error"]
    assert "nan" in failed["error"] or "inf" in failed["error"]
    wait_until(lambda: status(addr, good)["state"] == "succeeded", what="the next job succeeded on the same workers")


def test_a_model_too_large_is_refused_at_submit_and_a_worker_survives_one_that_does_not_fit(procs, tmp_path):
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), "--max-model-bytes", "64MiB")
    addr = sched.ready["addr"]
    procs.server(0, "--scheduler", addr)
    workers(procs, addr, 1)
    huge = job_file(tmp_path, "huge.yaml", name="huge", model={"kind": "mlp", "hidden": [10000000, 10000000]})
    result = run_psctl("submit", huge, "--scheduler", addr)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    # An MLP on a built-in source: its exact size (64 inputs, 10 classes: protocol/jobspec.py, known_data).
    assert "--max-model-bytes" in result.stderr and "take 400,003,040,000,040 bytes" in result.stderr, result.stderr
    # A cnn's size needs the image size after pooling: the spec alone gives 5.4 MB, under the limit; the
    # worker counts 82.8 MB and refuses it before allocating anything, and takes the next job.
    wide = job_file(tmp_path, "wide.yaml", name="wide", workers=1,
                    model={"kind": "cnn", "channels": [64], "kernel": 3, "hidden": [20000]})
    job = psctl_json("submit", wide, "--scheduler", addr)["job"]
    nxt = psctl_json("submit", job_file(tmp_path, "next.yaml", name="next", workers=1, steps=40),
                     "--scheduler", addr)["job"]
    wait_until(lambda: status(addr, job)["state"] == "failed", what="the too-large job failed")
    assert "over the scheduler's limit" in status(addr, job)["error"]
    wait_until(lambda: status(addr, nxt)["state"] == "succeeded", what="the next job succeeded")
    assert psctl_json("list", "--scheduler", addr)["jobs"][0]["id"] == nxt


def test_a_retried_submit_returns_the_same_job(procs, tmp_path):
    addr = procs.start("scheduler", "--state-dir", str(tmp_path / "s")).ready["addr"]
    path = job_file(tmp_path)
    first = psctl_json("submit", path, "--scheduler", addr, "--submission-id", "nightly-42")["job"]
    again = psctl_json("submit", path, "--scheduler", addr, "--submission-id", "nightly-42")["job"]
    other = psctl_json("submit", path, "--scheduler", addr)["job"]
    assert first == again != other
    assert sorted(j["id"] for j in psctl_json("list", "--scheduler", addr)["jobs"]) == sorted([first, other])
    bad = run_psctl("submit", path, "--scheduler", addr, "--submission-id", "x" * 200)
    assert bad.returncode == 2 and "--submission-id" in bad.stderr and "Traceback" not in bad.stderr


def test_a_worker_that_runs_out_of_memory_reports_it_and_takes_the_next_job(procs, tmp_path):
    # The scheduler lets a model through that no machine can allocate; each worker that
    # takes it hits MemoryError, reports it and lives on; three in a row fail the job.
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), "--max-model-bytes", "2000TiB")
    addr = sched.ready["addr"]
    procs.server(0, "--scheduler", addr)
    (worker,) = workers(procs, addr, 1)
    huge = job_file(tmp_path, "huge.yaml", name="huge", workers=1, model={"kind": "mlp", "hidden": [16, 10**13]})
    job = psctl_json("submit", huge, "--scheduler", addr)["job"]
    nxt = psctl_json("submit", job_file(tmp_path, "next.yaml", name="next", workers=1, steps=40),
                     "--scheduler", addr)["job"]
    wait_until(lambda: status(addr, job)["state"] == "failed", what="the job that cannot fit failed")
    error = status(addr, job)["error"]
    assert "MemoryError" in error and "3 times in a row" in error, error
    wait_until(lambda: status(addr, nxt)["state"] == "succeeded", what="the next job succeeded")
    assert worker.popen.poll() is None
    assert [w["worker"] for w in status(addr)["workers"]] == [worker.ready["worker"]]
