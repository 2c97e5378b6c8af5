"""`psctl bench consistency`, small: the command object in-process (it starts real
local clusters), tiny steps, the --json rows and the PNG.

No timing assertions: what a run did (its rows, its state, its steps, finite
figures), never how fast (a rate above zero fails on a machine under load).
"""
from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from worker.bench.consistency import aggregate, parse_policies
from worker.cli.cmd_bench_consistency import consistency

ISSUE_FIELDS = {"policy", "staleness_bound", "time_to_target_s", "steps_per_s", "test_accuracy",
                "max_staleness_seen"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NO_PLOT = "the bench's PNG needs matplotlib (pip install -e '.[test]')"


def finite_or_none(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value))


def test_bench_json_rows_and_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason=NO_PLOT)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    plot = tmp_path / "new-dir" / "consistency.png"  # the directory is created
    result = CliRunner().invoke(consistency, [
        "--steps", "12", "--policies", "bsp,ssp1,asp", "--slowdown", "2", "--target-loss", "5.0",
        "--poll", "0.1", "--json", "--plot", str(plot)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["label"] for r in rows] == ["bsp", "ssp1", "asp"]
    assert [r["policy"] for r in rows] == ["bsp", "ssp", "asp"]
    assert [r["staleness_bound"] for r in rows] == [None, 1, None]
    for r in rows:
        assert ISSUE_FIELDS <= set(r), r
        assert r["state"] == "succeeded" and r["error"] == "", r  # every partition did its 12 steps
        assert r["repeats"] == 1 and r["time_to_target_runs"] == [r["time_to_target_s"]]
        assert 0.0 <= r["test_accuracy"] <= 1.0
        # A loss of 5 is above the initial one (about ln 10): reached at the first sample.
        assert r["time_to_target_s"] is not None and r["time_to_target_s"] >= 0
        assert isinstance(r["steps_to_target"], int) and r["steps_to_target"] >= 0
        assert math.isfinite(r["final_train_loss"]) and 0 < r["final_train_loss"] < 5.0
        # Figures are numbers (or absent), whatever the machine's speed: never a claim about it.
        for key in ("steps_per_s", "wall_s", "time_to_target_s"):
            assert finite_or_none(r[key]), (key, r)
        for key in ("max_staleness_seen", "max_version_staleness", "max_parked_seen"):
            assert isinstance(r[key], int) and r[key] >= 0, (key, r)
    by = {r["label"]: r for r in rows}
    assert by["bsp"]["max_staleness_seen"] <= 1 and by["bsp"]["max_version_staleness"] == 0
    assert by["ssp1"]["max_staleness_seen"] <= 2
    assert by["asp"]["max_parked_seen"] == 0
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_bench_table_for_people(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason=NO_PLOT)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    plot = tmp_path / "c.png"
    result = CliRunner().invoke(consistency, [
        "--steps", "8", "--policies", "ssp0", "--target-loss", "1e-6", "--poll", "0.1", "--plot", str(plot)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    lines = result.stdout.strip().splitlines()
    assert lines[1].split()[:3] == ["policy", "s", "to"]
    assert lines[2].split()[:3] == ["ssp0", "0", "-"]  # a loss of 1e-6 is never reached
    assert plot.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("text", ["bsp,ssp", "bsp,foo", "asp,asp", "ssp-1"])
def test_bad_policy_lists_are_one_sentence(text):
    result = CliRunner().invoke(consistency, ["--policies", text])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("Error: --policies:")


def test_parse_policies():
    assert parse_policies("BSP, ssp10,asp") == [
        ("bsp", {"policy": "bsp"}), ("ssp10", {"policy": "ssp", "staleness": 10}), ("asp", {"policy": "asp"})]


def test_aggregate_takes_medians_with_never_as_infinity():
    base = {"label": "ssp3", "policy": "ssp", "staleness_bound": 3, "state": "succeeded", "error": "",
            "steps_per_s": 100.0, "test_accuracy": 0.9, "steps_to_target": 10, "final_train_loss": 0.1,
            "wall_s": 1.0, "max_staleness_seen": 2, "max_version_staleness": 3, "max_parked_seen": 1}
    rows = [dict(base, time_to_target_s=t, max_staleness_seen=m) for t, m in ((2.0, 2), (None, 4), (1.0, 3))]
    out = aggregate(rows)
    assert out["time_to_target_s"] == 2.0 and out["max_staleness_seen"] == 4
    assert out["time_to_target_runs"] == [2.0, None, 1.0] and out["repeats"] == 3
    assert aggregate(rows[:2])["time_to_target_s"] is None  # the median of (2, never) is never


def test_observer_skips_a_table_created_but_not_loaded(shard_factory):
    """The scheduler creates a job's tables before its initialising worker loads the
    values: a sample taken in between is skipped, not the end of the bench run."""
    from protocol.messages import Create
    from protocol.plan import make_plan
    from worker.bench.consistency import Observer, job_for
    from worker.client import ParamClient

    spec = job_for({"policy": "bsp"}, steps=4, workers=1)
    shard = shard_factory(0)
    job = "observed"
    plan_probe = Observer(spec, {"shards": [shard.endpoint],
                                 "plan": make_plan({"x": ((1,), "float32")}, 1, 4096).to_wire()}, job)
    arrays = plan_probe.model.arrays()
    plan_probe.close()
    plan = make_plan({n: (a.shape, str(a.dtype)) for n, a in arrays.items()}, 1, spec["partition_bytes"])
    observer = Observer(spec, {"shards": [shard.endpoint], "plan": plan.to_wire()}, job)
    owner = ParamClient([shard.endpoint], plan, job=job, worker="init", timeout_s=5, retries=1)
    try:
        assert observer.sample(0.0, None) is None  # no table yet
        owner._exchange({0: Create(**owner._common(0, -1), plan=plan.to_wire(),
                                   optimizer={"kind": "sgd", "lr": 0.1})})  # created, no values
        assert observer.sample(0.1, None) is None  # was: ShardError bad_state, ending the run
        owner.load(arrays)
        sample = observer.sample(0.2, None)
        assert sample is not None and math.isfinite(sample.train_loss) and sample.steps == 0
    finally:
        owner.close()
        observer.close()
