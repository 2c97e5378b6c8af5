"""BLAS threads of workers, and the limits `psctl run` hands its daemons.

`psctl run` (through worker/local_cluster.py) gives each worker
max(1, cores // workers) BLAS threads unless `--threads-per-worker` says
otherwise; `psctl worker --threads-per-worker N` resizes the worker's own
pool after numpy is loaded, which the environment variables could not.
Every figure is what the worker's BLAS library reports (threadpoolctl), read
back from the worker's READY line or its log. `--max-message-bytes`,
`--max-table-bytes` and `--max-model-bytes` reach the servers and the
scheduler: a request over the limit given is refused.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

from tests.procs import run_psctl
from tests.test_run_local import processes_mentioning, scheduler_addr
from worker.local_cluster import LocalCluster, worker_threads

JOB = {
    "name": "threads", "seed": 1, "workers": 2, "steps": 20,
    "model": {"kind": "mlp", "hidden": [64]},
    "data": {"source": "sklearn:digits", "batch_size": 32},
    "optimizer": {"kind": "momentum", "lr": 0.02},
}
RUN_TIMEOUT_S = 180.0


def write_job(tmp_path, **changes) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**JOB, **changes}))
    return str(path)


def one_sentence(result, *fragments: str) -> str:
    """The one `Error: ...` line of a refused command line (exit 2, no traceback, no usage banner)."""
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], result.stderr
    return lines[0]


def logged_blas_threads(log_path) -> int:
    """The `blas threads` figure a worker logged at start (JSON log lines)."""
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("msg") == "blas threads":
                return entry["blas_threads"]
    raise AssertionError(f"no 'blas threads' line in {log_path}:\n{log_path.read_text()[-2000:]}")


# --- the share --------------------------------------------------------------------------------

def test_each_worker_gets_the_cores_divided_among_the_workers():
    assert worker_threads(1, cores=16) == 16
    assert worker_threads(3, cores=16) == 5
    assert worker_threads(4, cores=2) == 1     # never none
    assert worker_threads(2) == max(1, (os.cpu_count() or 1) // 2)


@pytest.mark.parametrize("workers, option, expected", [
    (1, [], max(1, os.cpu_count() or 1)),               # the default: the machine's cores for the one worker
    (2, ["--threads-per-worker", "3"], 3),              # the option overrides it
])
def test_psctl_run_gives_its_workers_their_blas_threads(tmp_path, workers, option, expected):
    state = tmp_path / "state"
    result = run_psctl("run", write_job(tmp_path, workers=workers), "--json", "--state-dir", str(state), *option,
                       env={"PSCLUSTER_LOG_FORMAT": "json"}, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "succeeded"
    assert [logged_blas_threads(state / f"worker-{i}.log") for i in range(workers)] == [expected] * workers
    assert processes_mentioning(str(state), scheduler_addr(result.stderr)) == []


def test_local_cluster_gives_each_worker_its_share_unless_its_own_args_say_otherwise(tmp_path):
    cluster = LocalCluster(str(tmp_path))
    try:
        _addr, client = cluster.boot(1, [[], ["--threads-per-worker", "2"]], threads_per_worker=3)
        client.close()
        assert [cluster.ready_of(f"worker-{i}")["blas_threads"] for i in range(2)] == [3, 2]
        assert "blas_threads" not in cluster.ready_of("server-0")   # shards keep their single thread
    finally:
        cluster.stop()


def test_psctl_worker_resizes_the_pool_numpy_already_started(procs, tmp_path):
    """OPENBLAS_NUM_THREADS=1 sized the pool when numpy loaded; the option still takes effect."""
    addr = procs.start("scheduler", "--state-dir", str(tmp_path / "s")).ready["addr"]
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    plain = procs.start("worker", "--scheduler", addr, env=env)
    asked = procs.start("worker", "--scheduler", addr, "--threads-per-worker", "3", env=env)
    assert plain.ready["blas_threads"] == 1
    assert asked.ready["blas_threads"] == 3


@pytest.mark.parametrize("value", ["0", "-1", "x", "2.5"])
@pytest.mark.parametrize("command", [["worker", "--scheduler", "tcp://127.0.0.1:1"], ["run", "job.yaml"],
                                     ["bench", "scale"]])
def test_a_bad_thread_count_is_one_sentence(command, value):
    result = run_psctl(*command, "--threads-per-worker", value, timeout=60)
    one_sentence(result, "--threads-per-worker", repr(value))


def test_the_option_sets_what_numpy_uses():
    """threadpoolctl reaches the OpenBLAS numpy loaded here, in both directions (the worker's mechanism)."""
    from threadpoolctl import threadpool_info

    from worker.cli.cmd_worker import set_blas_threads

    blas = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    assert blas, f"numpy's BLAS is not visible to threadpoolctl: {threadpool_info()}"
    before = set_blas_threads(None)
    try:
        assert set_blas_threads(2) == 2
        assert set_blas_threads(1) == 1
        a = np.ones((64, 64), np.float32)
        assert float((a @ a)[0, 0]) == 64.0
    finally:
        set_blas_threads(before)


# --- the limits -------------------------------------------------------------------------------

def test_run_passes_max_message_bytes_to_its_servers(tmp_path):
    # The servers tell the scheduler their 4 KiB limit when they register: the job's 4 MiB slices
    # could never be sent to them, and the submit is refused with both figures.
    state = tmp_path / "state"
    result = run_psctl("run", write_job(tmp_path, workers=1), "--json", "--state-dir", str(state),
                       "--max-message-bytes", "4KiB", timeout=RUN_TIMEOUT_S)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--max-message-bytes of 4,096" in lines[0], result.stderr
    assert processes_mentioning(str(state)) == []


def test_run_passes_max_model_bytes_to_its_scheduler(tmp_path):
    result = run_psctl("run", write_job(tmp_path), "--max-model-bytes", "1KiB", "--quiet", timeout=RUN_TIMEOUT_S)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "--max-model-bytes" in lines[0] and "1,024" in lines[0], result.stderr


def test_boot_passes_server_args_to_every_shard(tmp_path):
    """--max-table-bytes of `psctl run` travels as boot's server_args: a table over it is refused."""
    from protocol.plan import make_plan
    from worker.client import ParamClient, ShardError

    cluster = LocalCluster(str(tmp_path))
    try:
        _addr, client = cluster.boot(2, [], server_args=["--max-table-bytes", "1KiB"])
        client.close()
        addrs = [cluster.ready_of(f"server-{k}")["addr"] for k in range(2)]
        plan = make_plan({"w": ((4096,), "float32")}, 2, 4096)   # 8 KiB a shard
        with ParamClient(addrs, plan, job="too-big", timeout_s=10.0, retries=0) as params:
            with pytest.raises(ShardError) as refused:
                params.create({"w": np.zeros(4096, np.float32)})
        assert "--max-table-bytes" in str(refused.value)
    finally:
        cluster.stop()


def test_bad_limits_are_one_sentence(tmp_path):
    job = write_job(tmp_path)
    for option in ("--max-message-bytes", "--max-table-bytes", "--max-model-bytes"):
        one_sentence(run_psctl("run", job, option, "lots", timeout=60), option, "'lots' is not a size")


def test_run_with_raised_limits_trains(tmp_path):
    result = run_psctl("run", write_job(tmp_path, workers=1, steps=5), "--quiet", "--threads-per-worker", "1",
                       "--max-message-bytes", "1GiB", "--max-table-bytes", "1GiB", "--max-model-bytes", "1GiB",
                       timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
