"""`psctl bench overlap`, small: the command in this process (it starts a real local cluster),
a tiny model and few steps; the JSON figures and every process reaped. No timing claims."""
from __future__ import annotations

import json
import math
import os

from click.testing import CliRunner

from tests.procs import record_started
from worker.bench import overlap as bench
from worker.cli.cmd_bench_overlap import overlap


def test_json_figures_and_every_process_reaped(monkeypatch):
    pids = record_started(monkeypatch, bench)
    result = CliRunner().invoke(overlap, ["--params", "200k", "--steps", "4", "--repeat", "1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert abs(out["params"] - 200_000) <= 2_000 and out["workers"] == 2 and out["servers"] == 1
    assert len(out["off_runs"]) == len(out["on_runs"]) == 1
    for key in ("off_examples_per_s", "on_examples_per_s", "on_over_off"):
        assert math.isfinite(out[key]) and out[key] > 0, (key, out)
    assert out["on_over_off"] == out["on_examples_per_s"] / out["off_examples_per_s"]
    assert len(pids) == 4 and not [p for p in pids if os.path.exists(f"/proc/{p}")]  # scheduler, shard, 2 workers


def test_bad_params_is_one_sentence():
    result = CliRunner().invoke(overlap, ["--params", "lots"])
    assert result.exit_code == 2 and "--params" in result.output and "Traceback" not in result.output
