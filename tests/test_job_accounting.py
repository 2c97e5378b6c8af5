"""Job accounting, pure: the job store (sqlite files under tmp_path), a running job's partitions
and holders, and one step over several partitions (worker/step.py)."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from ps.registry import JobStore
from ps.sched.jobs import QUEUED, RUNNING, SUCCEEDED, JobRecord, JobRun, Partition, Segment
from tests.test_spec_partitions import DIGITS, job
from worker.data import load_dataset, worker_batches
from worker.nn.model import build_model
from worker.step import Diverged, accumulate_gradients, dropout_seed, global_norm, partitions_step

# --- ps/registry.py: JobStore ---------------------------------------------------------------------


def record(seq: int, **changes) -> JobRecord:
    fields = dict(id=f"job-{seq}", seq=seq, name=f"name{seq}", state=QUEUED, spec=job(name=f"name{seq}"),
                  submitted=1000.0 + seq)
    fields.update(changes)
    return JobRecord(**fields)


def test_job_store_round_trips_rows(tmp_path):
    rows = [record(1),
            record(2, state=SUCCEEDED, started=1003.5, finished=1010.25, shards=["tcp://a:1"],
                   tensors=[["dense0.W", [64, 128], "float32"]], nonlearned=["bn0.running_mean"],
                   progress={"summary": {"steps_done": 10}}, result={"test_accuracy": 0.9}, error="",
                   submission_id="sub-2", spec=job(name="name2", epochs=1.5)),
            record(3, state="failed", error="diverged at step 3")]
    store = JobStore(tmp_path)
    for r in rows:
        store.insert(r.row())
    store.close()
    again = JobStore(tmp_path)
    assert again.load() == rows
    again.close()


def test_job_store_puts_running_jobs_back_in_the_queue(tmp_path):
    store = JobStore(tmp_path)
    store.insert(record(1, state=RUNNING, started=1001.0).row())
    store.insert(record(2, state=SUCCEEDED).row())
    loaded = store.load()
    assert [(r.id, r.state) for r in loaded] == [("job-1", QUEUED), ("job-2", SUCCEEDED)]
    assert loaded[0].started == 1001.0
    store.close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("SELECT id, state FROM jobs ORDER BY seq").fetchall() == \
            [("job-1", QUEUED), ("job-2", SUCCEEDED)]
    reopened = JobStore(tmp_path)
    assert [r.state for r in reopened.load()] == [QUEUED, SUCCEEDED]
    reopened.close()


@pytest.mark.parametrize("column, value", [
    ("spec", "{not json"),
    ("state", "paused"),
    ("spec", '{"model": {"kind": "rnn"}, "data": {"source": "sklearn:digits"}, "steps": 1}'),
    ("spec", "[1, 2]"),
    ("shards", '{"a": 1}'),
    ("plan", '{"num_shards": "two"}'),
])
def test_job_store_skips_unreadable_rows(tmp_path, column, value):
    store = JobStore(tmp_path)
    for seq in (1, 2, 3):
        store.insert(record(seq).row())
    store.close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute(f"UPDATE jobs SET {column} = ? WHERE id = 'job-2'", (value,))
    store = JobStore(tmp_path)
    assert [r.id for r in store.load()] == ["job-1", "job-3"]
    store.close()


def test_job_store_update_sets_known_columns_only(tmp_path):
    store = JobStore(tmp_path)
    store.insert(record(1).row())
    store.update("job-1", {"bogus": 1, "error": "it broke", "result": {"steps_done": 4}, "id": "job-9"})
    store.update("job-1", {"bogus": 2})                 # nothing known: nothing happens
    store.update("job-1", {})
    (loaded,) = store.load()
    assert loaded.id == "job-1"
    assert loaded.error == "it broke"
    assert loaded.result == {"steps_done": 4}
    assert loaded == record(1, error="it broke", result={"steps_done": 4})
    store.close()


def test_job_store_counts_incarnations(tmp_path):
    store = JobStore(tmp_path)
    assert [store.next_incarnation() for _ in range(3)] == [1, 2, 3]
    store.close()
    store = JobStore(tmp_path)
    assert store.next_incarnation() == 4
    store.close()


OLD_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, name TEXT NOT NULL, state TEXT NOT NULL,
    spec TEXT NOT NULL, tensors TEXT NOT NULL, nonlearned TEXT NOT NULL, submitted REAL NOT NULL,
    started REAL, finished REAL, plan TEXT, shards TEXT,
    progress TEXT NOT NULL DEFAULT '{}', result TEXT NOT NULL DEFAULT '{}', error TEXT NOT NULL DEFAULT ''
)
"""


def test_job_store_migrates_a_store_without_submission_ids(tmp_path):
    import json
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute(OLD_SCHEMA)
        db.execute("INSERT INTO jobs (id, seq, name, state, spec, tensors, nonlearned, submitted) "
                   "VALUES ('job-1', 1, 'name1', 'queued', ?, '[]', '[]', 1001.0)", (json.dumps(job(name="name1")),))
    db.close()
    store = JobStore(tmp_path)
    columns = [r["name"] for r in store.db.execute("PRAGMA table_info(jobs)")]
    assert columns[-1] == "submission_id"
    assert store.load() == [record(1)]
    store.insert(record(2, submission_id="sub-2").row())
    assert [r.submission_id for r in store.load()] == ["", "sub-2"]
    store.close()
    again = JobStore(tmp_path)                          # opening a migrated store again changes nothing
    assert [r.id for r in again.load()] == ["job-1", "job-2"]
    again.close()


# --- ps/sched/jobs.py: Partition and JobRun -------------------------------------------------------


def make_run(*, workers: int = 2, steps: int | None = 10, batch: int = 16, progress: dict | None = None) -> JobRun:
    fields = {"workers": workers, "data": {"source": "sklearn:digits", "batch_size": batch}}
    spec = job(steps=steps, **fields) if steps is not None else job(epochs=2, **fields)
    rec = JobRecord(id="job-1", seq=1, name="job", state=RUNNING, spec=spec, submitted=0.0, progress=progress or {})
    return JobRun(rec, ["tcp://127.0.0.1:7000"], epoch_base=0, now=0.0)


def test_partition_examples_sums_every_segment():
    p = Partition(0, steps=20, segments=[Segment("w1", 0, 3), Segment("w2", 3, 7), Segment("", 7, 9),
                                         Segment("w3", 9, 9)])
    assert p.examples(16) == 9 * 16
    assert p.examples(1) == 9
    assert Partition(1).examples(32) == 0
    assert Partition(2, segments=[Segment("w", 5, 2), Segment("v", 2, 4)]).examples(10) == 20


def test_progress_counts_only_the_holder():
    run = make_run()
    run.grant("w1", [0])
    assert run.progress("w2", {0: {"from": 0, "step": 5, "loss": 1.0}}) is False
    assert run.progress("w1", {1: {"from": 0, "step": 5}}) is False      # p1 has no holder
    assert run.progress("w1", {7: {"from": 0, "step": 5}, -1: {"step": 2}}) is False
    p0, p1 = run.partitions
    assert (p0.done_steps, p0.loss, p1.done_steps) == (0, None, 0)
    assert [s.wire() for s in p0.segments] == [{"worker": "w1", "first": 0, "last": 0}]
    assert run.progress("w1", {0: {"from": 0, "step": 5, "loss": 1.0, "accuracy": 0.5, "max_staleness": 2}}) is True
    assert (p0.done_steps, p0.loss, p0.accuracy, p0.max_staleness) == (5, 1.0, 0.5, 2)


def test_progress_counts_steps_only_forward():
    run = make_run()
    run.grant("w1", [0])
    p = run.partitions[0]
    assert run.progress("w1", {0: {"from": 0, "step": 5}}) is True
    assert run.progress("w1", {0: {"step": 3}}) is False
    assert run.progress("w1", {0: {"step": 5}}) is False
    assert (p.done_steps, p.segments[-1].last) == (5, 5)
    assert run.progress("w1", {0: {"step": 6, "max_staleness": 1}}) is True
    assert p.max_staleness == 1
    run.progress("w1", {0: {"max_staleness": 0}})
    assert p.max_staleness == 1                                          # the most seen, not the last
    assert run.progress("w1", {0: {"step": 99}}) is True
    assert p.done_steps == 10 and p.done and p.segments[-1].last == 10  # capped at the steps owed
    assert p.examples(16) == 10 * 16


def test_a_new_holder_reporting_beyond_the_last_report_extends_the_previous_holder():
    run = make_run()
    run.grant("w1", [0])
    run.progress("w1", {0: {"from": 0, "step": 4}})
    run.ungrant([0])                  # w1 died: where it got to is not known
    run.grant("w2", [0])
    p = run.partitions[0]
    assert [s.wire() for s in p.segments] == [{"worker": "w1", "first": 0, "last": 4},
                                              {"worker": "w2", "first": 4, "last": 4}]
    assert run.progress("w2", {0: {"from": 7, "step": 8}}) is True
    assert [s.wire() for s in p.segments] == [{"worker": "w1", "first": 0, "last": 7},
                                              {"worker": "w2", "first": 7, "last": 8}]
    assert p.done_steps == 8
    assert p.examples(16) == 8 * 16
    # the start is read once: a later "from" changes nothing
    run.progress("w2", {0: {"from": 9}})
    assert p.segments[-1].wire() == {"worker": "w2", "first": 7, "last": 8}


def test_a_gap_before_the_first_report_is_recorded_unattributed():
    run = make_run()
    run.grant("w1", [1])
    assert run.progress("w1", {1: {"from": 3, "step": 4}}) is True
    p = run.partitions[1]
    assert [s.wire() for s in p.segments] == [{"worker": "", "first": 0, "last": 3},
                                              {"worker": "w1", "first": 3, "last": 4}]
    assert p.done_steps == 4 and p.examples(16) == 4 * 16


def test_ungrant_with_the_step_reached_extends_the_holder():
    run = make_run()
    run.grant("w1", [0, 1])
    run.progress("w1", {0: {"from": 0, "step": 4}, 1: {"from": 0, "step": 2}})
    epoch = run.epoch
    run.ungrant([0, 1], reached={0: 6})
    p0, p1 = run.partitions
    assert (p0.done_steps, p0.segments[-1].last, p0.holder) == (6, 6, None)
    assert (p1.done_steps, p1.segments[-1].last, p1.holder) == (2, 2, None)
    assert run.epoch == epoch + 1


def test_summary_figures():
    run = make_run(workers=3, batch=16)
    run.grant("w1", [0])
    run.grant("w2", [1])
    run.progress("w1", {0: {"from": 0, "step": 7, "loss": 2.0, "accuracy": 0.25}})
    run.progress("w2", {1: {"from": 0, "step": 3, "loss": 1.0, "accuracy": 0.75, "max_staleness": 4}})
    run.train_started, run.train_ended = 10.0, 14.0
    s = run.summary(100.0)
    assert s["steps_done"] == 10
    assert s["steps_asked"] == 30
    assert s["slowest"] == {"partition": 2, "steps_done": 0, "steps": 10}
    assert s["examples"] == 10 * 16
    assert s["train_s"] == 4.0
    assert s["examples_per_s"] == 40.0
    assert s["loss"] == 1.5 and s["accuracy"] == 0.5
    assert (s["workers"], s["partitions"], s["max_staleness"], s["stopping"]) == (2, 3, 4, False)
    assert s["epoch"] == run.epoch == 2
    run.train_ended = None
    assert run.summary(20.0)["train_s"] == 10.0
    assert run.summary(20.0)["examples_per_s"] == 16.0


def test_summary_slowest_and_untimed_training():
    run = make_run(workers=2)
    run.grant("w1", [0, 1])
    run.progress("w1", {0: {"from": 0, "step": 6}, 1: {"from": 0, "step": 2}})
    s = run.summary(5.0)
    assert s["slowest"] == {"partition": 1, "steps_done": 2, "steps": 10}
    assert s["train_s"] == 0.0 and s["examples_per_s"] == 0.0        # training never started
    assert s["workers"] == 1


def test_summary_of_an_epochs_job_before_the_data_is_measured():
    run = make_run(steps=None)
    s = run.summary(0.0)
    assert s["steps_asked"] is None
    assert s["steps_done"] == 0
    assert s["slowest"] == {"partition": 0, "steps_done": 0, "steps": None}


def test_members_lists_partitions_with_steps_left():
    run = make_run(workers=3)
    run.grant("w1", [0])
    run.grant("w2", [1])
    run.progress("w1", {0: {"from": 0, "step": 10}})                   # p0 is done
    clocks, holders = run.members()
    assert clocks == {"p1": -1, "p2": -1}
    assert holders == {"p1": "w2", "p2": ""}
    run.stopping = True
    assert run.members() == ({}, {})


def test_result_final_loss_is_the_mean_over_partitions_with_a_loss():
    run = make_run(workers=3)
    assert run.result(1.0)["final_loss"] is None
    run.grant("w1", [0, 1])
    run.progress("w1", {0: {"from": 0, "step": 2, "loss": 2.0}, 1: {"from": 0, "step": 1, "loss": 1.0}})
    run.train_started, run.train_ended = 0.0, 2.0
    res = run.result(8.0)
    assert res["final_loss"] == 1.5
    assert (res["steps_done"], res["steps_asked"], res["examples"]) == (3, 30, 3 * 16)
    assert res["examples_per_s"] == 24.0
    assert res["wall_s"] == 8.0
    assert res["stopped_by"] == "steps"
    assert [p["steps_done"] for p in res["partitions"]] == [2, 1, 0]


def test_progress_record_restores_into_a_new_run():
    run = make_run()
    run.grant("w1", [0])
    run.progress("w1", {0: {"from": 2, "step": 5}})
    saved = run.progress_record(3.0)
    again = make_run(progress=saved)
    assert [p.done_steps for p in again.partitions] == [5, 0]
    assert [s.wire() for s in again.partitions[0].segments] == [s.wire() for s in run.partitions[0].segments]
    assert again.examples() == run.examples() == 5 * 16


# --- worker/step.py: partitions_step --------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    train, _ = load_dataset(DIGITS, seed=0)
    return train


def batches_of(train, parts, num):
    return {k: worker_batches(train, k=k, num=num, batch_size=16, seed=0) for k in parts}


def model_for(train, **model):
    spec = job(model={"kind": "mlp", "hidden": [32], **model})["model"]
    return build_model(spec, train.input_shape, train.num_classes, seed=0)


def one_partition(model, batch, step, micro):
    """(grads, stat deltas, loss) of one partition's step alone, statistics restored afterwards."""
    before = {k: v.copy() for k, v in model.stats.items()}
    x, y = batch.batch(step)
    loss, _ = accumulate_gradients(model, x, y, micro)
    grads = {k: g.copy() for k, g in model.grads.items()}
    deltas = {k: d.copy() for k, d in model.stat_deltas().items()}
    for k, v in model.stats.items():
        v[...] = before[k]
    return grads, deltas, float(loss)


@pytest.mark.parametrize("batchnorm, micro", [(False, 1), (False, 2), (True, 1), (True, 4)])
def test_step_gradient_is_the_mean_of_each_partitions_gradient(digits, batchnorm, micro):
    model = model_for(digits, batchnorm=batchnorm)
    b = batches_of(digits, (0, 1), 2)
    ref = [one_partition(model, b[k], 3, micro) for k in (0, 1)]
    stats_before = {k: v.copy() for k, v in model.stats.items()}
    params_before = {k: v.copy() for k, v in model.params.items()}
    res = partitions_step(model, b, 3, micro_batches=micro, clip_norm=0.0, seed=0)
    assert set(res.grads) == set(model.params)
    for name in model.params:
        np.testing.assert_allclose(res.grads[name], (ref[0][0][name] + ref[1][0][name]) / 2, rtol=1e-6, atol=1e-6)
    assert res.norm == -1.0
    assert res.losses == pytest.approx({0: ref[0][2], 1: ref[1][2]}, abs=1e-6)
    assert set(res.accuracies) == {0, 1}
    assert res.examples == 32
    for name, v in model.params.items():
        assert np.array_equal(v, params_before[name])
    for name, v in model.stats.items():                 # running statistics back where they were
        assert np.array_equal(v, stats_before[name])
    if batchnorm:
        assert set(res.deltas) == set(model.stats) and model.stats
        for name in model.stats:
            mean = (ref[0][1][name] + ref[1][1][name]) / 2
            assert np.abs(mean).max() > 0
            np.testing.assert_allclose(res.deltas[name], mean, rtol=1e-6, atol=1e-6)
    else:
        assert res.deltas == {}


def test_step_clips_each_partition_by_its_own_norm(digits):
    model = model_for(digits)
    b = batches_of(digits, (0, 1), 2)
    ref = [one_partition(model, b[k], 0, 1)[0] for k in (0, 1)]
    norms = [global_norm(g) for g in ref]
    clip = 0.5 * min(norms)
    assert clip > 0
    res = partitions_step(model, b, 0, micro_batches=1, clip_norm=clip, seed=0)
    assert res.norm == -1.0
    for name in model.params:
        want = (ref[0][name] * (clip / norms[0]) + ref[1][name] * (clip / norms[1])) / 2
        np.testing.assert_allclose(res.grads[name], want, rtol=1e-5, atol=1e-7)
    unclipped = partitions_step(model, b, 0, micro_batches=1, clip_norm=0.0, seed=0)
    assert global_norm(unclipped.grads) > global_norm(res.grads)


def test_step_clipping_leaves_small_gradients_alone(digits):
    model = model_for(digits)
    b = batches_of(digits, (0, 1), 2)
    ref = [one_partition(model, b[k], 0, 1)[0] for k in (0, 1)]
    big = 10 * max(global_norm(g) for g in ref)
    res = partitions_step(model, b, 0, micro_batches=1, clip_norm=big, seed=0)
    for name in model.params:
        np.testing.assert_allclose(res.grads[name], (ref[0][name] + ref[1][name]) / 2, rtol=1e-6, atol=1e-6)
    assert res.norm == -1.0


def test_step_with_one_partition_carries_the_global_norm(digits):
    model = model_for(digits, batchnorm=True)
    b = batches_of(digits, (1,), 3)
    ref, deltas, loss = one_partition(model, b[1], 2, 1)
    res = partitions_step(model, b, 2, micro_batches=1, clip_norm=0.5, seed=0)
    assert res.norm == pytest.approx(global_norm(ref), rel=1e-6)
    assert res.norm == global_norm(res.grads)
    assert res.norm > 0.5                              # not clipped here: the shards clip by this norm
    for name in model.params:
        np.testing.assert_allclose(res.grads[name], ref[name], rtol=1e-6, atol=1e-7)
    for name in model.stats:
        np.testing.assert_allclose(res.deltas[name], deltas[name], rtol=1e-6, atol=1e-7)
    assert list(res.losses) == [1] and res.losses[1] == pytest.approx(loss, abs=1e-6)
    assert res.examples == 16


def test_step_raises_diverged_naming_step_partition_and_value(digits):
    model = model_for(digits)
    model.params["dense0.W"][0, 0] = np.nan
    b = batches_of(digits, (1, 2), 3)
    with pytest.raises(Diverged) as info:
        partitions_step(model, b, 5, micro_batches=1, clip_norm=0.0, seed=0)
    text = str(info.value)
    assert "step 5" in text
    assert "partition 1" in text
    assert "nan" in text
    assert isinstance(info.value, ArithmeticError)


def test_dropout_masks_depend_only_on_seed_partition_and_step(digits):
    b = batches_of(digits, (0, 1), 2)
    fresh = model_for(digits, dropout=0.5)
    res = partitions_step(fresh, b, 3, micro_batches=1, clip_norm=0.0, seed=11)
    first = {k: g.copy() for k, g in res.grads.items()}
    other = model_for(digits, dropout=0.5)
    partitions_step(other, b, 1, micro_batches=1, clip_norm=0.0, seed=11)  # draws masks for another step first
    again = partitions_step(other, b, 3, micro_batches=1, clip_norm=0.0, seed=11)
    for name in first:
        assert np.array_equal(again.grads[name], first[name])
    different = partitions_step(model_for(digits, dropout=0.5), b, 3, micro_batches=1, clip_norm=0.0, seed=12)
    assert any(not np.array_equal(different.grads[name], first[name]) for name in first)


def test_dropout_seed_differs_by_seed_partition_and_step():
    seeds = {dropout_seed(s, p, t) for s in (0, 1) for p in (0, 1, 2) for t in (0, 1, 2)}
    assert len(seeds) == 18
    assert dropout_seed(3, 1, 4) == dropout_seed(3, 1, 4)
