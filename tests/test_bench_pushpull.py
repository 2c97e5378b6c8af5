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

from worker.bench import pushpull as bench
from worker.cli.cmd_bench_pushpull import pushpull

ROW_FIELDS = {"op", "size", "median_s", "p90_s", "raw_median_s", "slowdown", "floor_median_s", "over_floor"}


class StartedList(list):
    """The pids of the children, and `ready`: each one's name -> the facts of its READY line."""

    def __init__(self):
        super().__init__()
        self.ready: dict[str, dict] = {}


@pytest.fixture
def started(monkeypatch):
    """The pids of every child the bench starts, recorded as it starts them."""
    pids = StartedList()

    class Recording(bench.LocalCluster):
        def start(self, name, *args, **kwargs):
            try:
                pids.ready[name] = facts = super().start(name, *args, **kwargs)
                return facts
            finally:
                pids.extend(p for p in self.pids if p not in pids)

    monkeypatch.setattr(bench, "LocalCluster", Recording)
    return pids


def alive(pid: int) -> bool:
    """True while `pid` exists, zombies included (an unreaped child still has /proc/PID)."""
    return os.path.exists(f"/proc/{pid}")


def test_json_rows_and_every_process_reaped(started):
    result = CliRunner().invoke(pushpull, [
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
        assert 0 < row["floor_median_s"] <= row["floor_p90_s"]
        assert row["over_floor"] == pytest.approx(row["median_s"] / row["floor_median_s"])
    assert len(started) == 4  # two shards, two raw echo servers
    assert not [pid for pid in started if alive(pid)]


def test_curve_json_rows_carry_the_ratio_to_plain(started):
    result = CliRunner().invoke(pushpull, ["--size", "4KiB", "--repeat", "3", "--curve", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["curve"] is True
    rows = out["results"]
    assert [r["op"] for r in rows] == ["push", "pull", "push_pull"]
    for row in rows:
        assert ROW_FIELDS <= set(row)
        assert 0 < row["curve_median_s"] <= row["curve_p90_s"]
        assert row["curve_over_plain"] == pytest.approx(row["curve_median_s"] / row["median_s"])
        assert row["slowdown"] == pytest.approx(row["median_s"] / row["raw_median_s"])  # plain, as without --curve
    # one plain shard, one CURVE shard (it says so when ready), one raw echo server; all reaped
    assert started.ready["server-0"]["curve"] is False
    assert started.ready["curve-server-0"]["curve"] is True
    assert len(started) == 3
    assert not [pid for pid in started if alive(pid)]


def test_curve_table_adds_its_columns_only_with_curve():
    row = {"op": "pull", "size": 4096, "median_s": 1e-4, "p90_s": 2e-4, "gb_per_s": 0.04, "raw_median_s": 5e-5,
           "raw_p90_s": 6e-5, "raw_gb_per_s": 0.08, "slowdown": 2.0, "floor_median_s": 6e-5, "over_floor": 1.67}
    plain = bench.format_table([row])
    assert "curve" not in plain
    with_curve = bench.format_table([{**row, "curve_median_s": 1.5e-4, "curve_p90_s": 3e-4,
                                      "curve_over_plain": 1.5}]).splitlines()
    assert with_curve[0].split()[-4:] == ["curve", "p90", "ms", "curve/plain"]
    assert with_curve[1].split()[-3:] == ["0.150", "0.300", "1.50"]


def test_failure_mid_run_still_reaps(started, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("measurement failed")

    monkeypatch.setattr(bench, "bench_size", broken)
    result = CliRunner().invoke(pushpull, ["--size", "4KiB", "--repeat", "1"])
    assert isinstance(result.exception, RuntimeError)
    assert len(started) == 2
    assert not [pid for pid in started if alive(pid)]


def test_bad_size_is_refused_before_anything_starts(started):
    result = CliRunner().invoke(pushpull, ["--size", "4097"])
    assert result.exit_code != 0
    assert "multiple of 4" in result.output
    assert started == []


def test_table_output_names_every_column(started):
    result = CliRunner().invoke(pushpull, ["--size", "8KiB", "--repeat", "2"])
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[1]
    for column in ("median ms", "p90 ms", "GB/s", "raw median ms", "slowdown", "floor ms", "over floor"):
        assert column in header
    assert "push_pull" in result.output and "8 KiB" in result.output


def test_floor_server_really_updates_and_echo_stays_plain(tmp_path):
    """The floor must do the work it claims: a one-pass update of the server's own parameters."""
    import numpy as np

    from worker.bench.raw_echo import EchoClient

    children = bench.LocalCluster(str(tmp_path))
    try:
        addr = children.start("echo", "--bind", "tcp://127.0.0.1:0", module="worker.bench.raw_echo")["addr"]
        echo = EchoClient([addr], timeout_s=10)
        try:
            grads = [np.full(8, 1.5, np.float32), np.full(4, 0.25, np.float32)]
            sizes = [g.nbytes for g in grads]
            for step in (1, 2):
                (reply,) = echo.request({0: [EchoClient.sizes_frame(sizes, update=True), *grads]})
                assert reply[0].bytes == b"r"
                got = [np.frombuffer(f.buffer, np.float32) for f in reply[1:]]
                np.testing.assert_array_equal(got[0], np.full(8, -1.5 * step, np.float32))
                np.testing.assert_array_equal(got[1], np.full(4, -0.25 * step, np.float32))
            # a floor pull (no payload) reads the updated parameters without changing them
            (reply,) = echo.request({0: [EchoClient.sizes_frame(sizes, update=True)]})
            np.testing.assert_array_equal(np.frombuffer(reply[1].buffer, np.float32), np.full(8, -3.0, np.float32))
            # the plain echo answers from its own filled buffers, untouched by the updates
            (reply,) = echo.request({0: [EchoClient.sizes_frame(sizes), *grads]})
            assert [len(f) for f in reply[1:]] == sizes and set(reply[1].bytes) == {0x5A}
        finally:
            echo.close()
    finally:
        children.stop()


@pytest.mark.parametrize("wire", ["fp16", "topk:0.1"])
def test_wire_rows_carry_the_ratio_to_float32(started, wire):
    result = CliRunner().invoke(pushpull, ["--size", "64KiB", "--partition-bytes", "16KiB", "--repeat", "3",
                                           "--wire", wire, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["wire"] == wire
    rows = {r["op"]: r for r in out["results"]}
    for op in ("push", "push_pull"):
        row = rows[op]
        assert row["wire"] == wire.split(":")[0] and row["wire_median_s"] > 0 and row["codec_median_s"] > 0
        assert row["wire_over_f32"] == pytest.approx(row["wire_median_s"] / row["median_s"])
    assert "wire_median_s" not in rows["pull"]   # replies are float32 either way: nothing to compare
    assert not [pid for pid in started if alive(pid)]


def test_bad_wire_is_one_sentence(started):
    result = CliRunner().invoke(pushpull, ["--size", "4KiB", "--wire", "fp8"])
    assert result.exit_code == 2 and "compression: expected none, fp16 or topk:RATIO" in result.output
    assert started == []
