"""Smoke test of `psctl bench scale`: a small model, two shards, two workers; no timing claims.

Runs the click command in this process and reads its `--json` object and
its table; checks that every figure is there and sane (RSS above zero,
finite ratios, examples counted from what the job did) and that every
process it started is gone afterwards, on success and when it is
interrupted half-way. The sizing and the option parsing are pure.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil

import pytest
from click.testing import CliRunner

from tests.procs import record_started, run_psctl
from worker.bench import scale as bench
from worker.cli.cmd_bench_scale import scale

SMALL = ["--params", "2M", "--servers", "2", "--workers", "2", "--steps", "2", "--repeat", "3"]


@pytest.fixture
def started(monkeypatch):
    """The pids of every child the bench starts, recorded as it starts them."""
    return record_started(monkeypatch, bench)


def alive(pid: int) -> bool:
    """True while `pid` exists, zombies included (an unreaped child still has /proc/PID)."""
    return os.path.exists(f"/proc/{pid}")


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# --- pure ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, count", [("2M", 2_000_000), ("500M", 500_000_000), ("1.5G", 1_500_000_000),
                                         ("200k", 200_000), ("2000000", 2_000_000), ("100K", 100_000)])
def test_parameter_counts_read_as_people_write_them(text, count):
    assert bench.parse_count(text) == count


@pytest.mark.parametrize("text", ["5X", "abc", "", "2 M B", "50", "0", "1000G"])
def test_a_bad_parameter_count_is_one_sentence(text):
    with pytest.raises(ValueError) as refused:
        bench.parse_count(text)
    assert str(refused.value).startswith("--params ") and "\n" not in str(refused.value)


@pytest.mark.parametrize("params", [100_000, 2_000_000, 20_000_000, 500_000_000, 1_500_000_000])
def test_the_model_is_sized_within_one_percent(params):
    hidden = bench.hidden_for(params)
    assert abs(bench.count_params(hidden) - params) <= 0.01 * params
    spec = bench.job_spec(params, workers=2, steps=3, batch_size=32, policy="asp")
    assert spec["model"]["hidden"] == [hidden, hidden] and spec["optimizer"]["kind"] == "adam"


@pytest.mark.parametrize("value", ["5X", "0", "-1", "1e9"])
def test_a_bad_params_option_is_one_sentence(value):
    result = run_psctl("bench", "scale", "--params", value, timeout=60)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: --params "), result.stderr


# --- a real run ---------------------------------------------------------------------------------

def test_json_has_every_figure_and_every_process_is_reaped(started):
    result = CliRunner().invoke(scale, [*SMALL, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert abs(out["params"] - 2_000_000) <= 20_000 and out["params_asked"] == 2_000_000
    assert out["model_bytes"] == 4 * out["params"]
    assert (out["servers"], out["workers"], out["optimizer"], out["policy"]) == (2, 2, "adam", "asp")
    assert len(out["bytes_per_shard"]) == 2 and sum(out["bytes_per_shard"]) == out["model_bytes"]
    procs = out["processes"]
    assert [p["name"] for p in procs] == ["server-0", "server-1", "worker-0", "worker-1"]
    for p in procs:
        assert p["peak_rss_bytes"] > 0 and finite_positive(p["rss_over_held"])
        assert p["rss_over_held"] == pytest.approx(p["peak_rss_bytes"] / p["holds_bytes"])
    for p in procs[:2]:
        assert p["holds_bytes"] == 3 * p["param_bytes"]   # values, Adam's m and v
    for p in procs[2:]:
        assert p["holds_bytes"] == out["model_bytes"] and p["blas_threads"] == out["threads_per_worker"]
    pp = out["push_pull"]
    assert pp["bytes_out"] == pp["bytes_back"] == out["model_bytes"] and pp["repeats"] == 3
    for key in ("cold_s", "warm_s", "raw_cold_s", "raw_warm_s", "cold_over_warm", "warm_over_raw"):
        assert finite_positive(pp[key]), (key, pp)
    assert pp["cold_over_warm"] == pytest.approx(pp["cold_s"] / pp["warm_s"])
    assert pp["warm_over_raw"] == pytest.approx(pp["warm_s"] / pp["raw_warm_s"])
    training = out["training"]
    assert training["steps_done"] == training["steps_asked"] == 2 * 2
    assert training["examples"] == 2 * 2 * 32                      # what the partitions did
    assert finite_positive(training["train_s"])
    assert training["examples_per_s"] == pytest.approx(training["examples"] / training["train_s"])
    assert len(started) == 1 + 2 + 2 + 2   # the scheduler, the shards, the workers, the raw echo servers
    assert not [pid for pid in started if alive(pid)]


def test_the_table_for_people(started):
    result = CliRunner().invoke(scale, [*SMALL, "--policy", "bsp", "--threads-per-worker", "1"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    for line in ("process", "server-0", "server-1", "worker-0", "worker-1", "cold ms", "raw pyzmq", "warm / raw",
                 "examples/s", "adam, bsp"):
        assert line in text, text
    assert not [pid for pid in started if alive(pid)]


def test_an_interrupted_run_reaps_every_process(started, monkeypatch):
    """Ctrl-C while the job trains (KeyboardInterrupt where the bench waits for it): nothing is left."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "wait_for_job", interrupted)
    result = CliRunner().invoke(scale, SMALL)
    assert result.exit_code != 0 and "Aborted!" in result.output, result.output  # click's word for Ctrl-C
    assert len(started) == 1 + 2 + 2 + 2
    assert not [pid for pid in started if alive(pid)]


def test_a_failed_job_is_one_sentence_naming_the_logs(started, monkeypatch):
    """A job that diverges (Adam at lr 1e12): the command says so in one line, and nothing is left."""
    plain = bench.job_spec

    def diverging(*args, **kwargs):
        spec = plain(*args, **kwargs)
        return {**spec, "optimizer": {**spec["optimizer"], "lr": 1e12}}

    monkeypatch.setattr(bench, "job_spec", diverging)
    result = CliRunner().invoke(scale, [*SMALL, "--steps", "5", "--json"])
    assert result.exit_code == 1, result.output
    error = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and "failed" in error[0] and "diverged" in error[0], result.stderr
    logs = re.search(r"\(logs in (\S+)\)", error[0])
    assert logs and os.path.isfile(os.path.join(logs.group(1), "worker-0.log")), error[0]
    shutil.rmtree(logs.group(1))
    assert result.stdout == ""
    assert not [pid for pid in started if alive(pid)]
