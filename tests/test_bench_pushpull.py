"""Smoke test of `psctl bench pushpull`: tiny sizes, few repeats, no timing claims.

Runs the click command in this process, reads its `--json` rows, and checks
that every process it started is gone (reaped) afterwards, on success and
when the measurement fails half-way.
"""
from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from worker.cli import cmd_bench_pushpull as bench

ROW_FIELDS = {"op", "size", "median_s", "p90_s", "raw_median_s", "slowdown"}


@pytest.fixture
def started(monkeypatch):
    """The pids of every child the bench starts, recorded as it starts them."""
    pids: list[int] = []

    class Recording(bench.LocalCluster):
        def start(self, *args, **kwargs):
            try:
                return super().start(*args, **kwargs)
            finally:
                pids.extend(p for p in self.pids if p not in pids)

    monkeypatch.setattr(bench, "LocalCluster", Recording)
    return pids


def alive(pid: int) -> bool:
    """True while `pid` exists, zombies included (an unreaped child still has /proc/PID)."""
    return os.path.exists(f"/proc/{pid}")


def test_json_rows_and_every_process_reaped(started):
    result = CliRunner().invoke(bench.pushpull, [
        "--servers", "2", "--size", "4KiB", "--size", "64KiB", "--partition-bytes", "16KiB",
        "--repeat", "3", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["servers"] == 2
    rows = out["results"]
    assert [(r["op"], r["size"]) for r in rows] == [
        (op, size) for size in (4096, 65536) for op in ("push", "pull", "push_pull")]
    for row in rows:
        assert ROW_FIELDS <= set(row)
        assert row["repeats"] == 3
        assert 0 < row["median_s"] <= row["p90_s"]
        assert row["raw_median_s"] > 0
        assert row["slowdown"] == pytest.approx(row["median_s"] / row["raw_median_s"])
    assert len(started) == 4  # two shards, two raw echo servers
    assert not [pid for pid in started if alive(pid)]


def test_failure_mid_run_still_reaps(started, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("measurement failed")

    monkeypatch.setattr(bench, "bench_size", broken)
    result = CliRunner().invoke(bench.pushpull, ["--size", "4KiB", "--repeat", "1"])
    assert isinstance(result.exception, RuntimeError)
    assert len(started) == 2
    assert not [pid for pid in started if alive(pid)]


def test_bad_size_is_refused_before_anything_starts(started):
    result = CliRunner().invoke(bench.pushpull, ["--size", "4097"])
    assert result.exit_code != 0
    assert "multiple of 4" in result.output
    assert started == []


def test_table_output_names_every_column(started):
    result = CliRunner().invoke(bench.pushpull, ["--size", "8KiB", "--repeat", "2"])
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[1]
    for column in ("median ms", "p90 ms", "GB/s", "raw median ms", "slowdown"):
        assert column in header
    assert "push_pull" in result.output and "8 KiB" in result.output
