"""Checkpoint files with real files on disk (ps/checkpoint.py): what is written, what is refused.

Every damage a file can come back with is made to the newest of two
checkpoints, and the older one must be what `load_newest_valid` returns,
with one log line naming the file passed over and why. The damages that
must get past the zip layer and the checksums to be caught by a later
check (a wrong size, a NaN, another job's or shard's meta, a negative
version, missing optimizer state) are written with fresh checksums, as a
buggy or foreign writer would write them.
"""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from protocol.messages import SliceData
from protocol.plan import make_plan
from ps import checkpoint
from ps.checkpoint import BadCheckpoint
from ps.optim import make_optimizer
from ps.policy import make_policy
from ps.table import JobTable

JOB = "ck-job"
PLAN = make_plan({"w": ((64, 8), "float32"), "b": ((8,), "float32"), "mean": ((8,), "float32")}, 2, 256)


def table(job: str = JOB, shard: int = 0, optimizer: str = "adam", steps: int = 3) -> JobTable:
    initial = {s.sid: np.full(s.count, 0.5, np.float32) for s in PLAN.slices_on(shard)}
    t = JobTable(job, PLAN, shard, make_optimizer({"kind": optimizer, "lr": 0.1}), make_policy({"policy": "asp"}),
                 nonlearned=["mean"], initial=initial, checkpoint_every=5)
    for step in range(steps):
        t.policy.on_push("w0", step, ("push", step))  # the clock table moves as a push would move it
        t.apply([SliceData(sid, np.full(s.count, 0.1 * (step + 1), np.float32)) for sid, s in t.held.items()],
                step=step)
    return t


def write(root, t: JobTable):
    return checkpoint.write(root, checkpoint.snapshot_of(t)).path


@pytest.fixture
def skipped():
    """The 'checkpoint skipped' records logged meanwhile (a handler of our own: propagation may be off)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("pscluster.server")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.fixture
def two(tmp_path):
    """Versions 3 and 6 of JOB on shard 0: (directory, older table, newest path)."""
    t = table(steps=3)
    write(tmp_path, t)
    older = table(steps=3)
    for step in range(3, 6):
        t.policy.on_push("w0", step, ("push", step))
        t.apply([SliceData(sid, np.full(s.count, 0.3, np.float32)) for sid, s in t.held.items()], step=step)
    newest = write(tmp_path, t)
    return checkpoint.job_dir(tmp_path, JOB, 0), older, newest


def rewrite(path, change) -> None:
    """Read every array and the meta of `path`, let `change(meta, arrays)` edit them, write it back
    with fresh checksums (what a writer that got something else wrong would leave)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    meta.pop("arrays")
    change(meta, arrays)
    checkpoint.write_file(path, meta, arrays)


def first_value(arrays) -> str:
    return min(name for name in arrays if name.startswith("value."))


def truncate(path, _root):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def flip_byte(path, _root):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10  # inside the first arrays' data, well before the meta and the directory
    path.write_bytes(bytes(data))


def same_zip_other_bytes(path, _root):
    """An array changed and the zip rewritten around it, the meta's checksum left as it was."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    name = first_value(arrays)
    arrays[name] = arrays[name] + np.float32(1)
    meta = arrays.pop("meta")
    np.savez(path, meta=meta, **arrays)


def wrong_size(path, _root):
    rewrite(path, lambda meta, arrays: arrays.update({first_value(arrays): np.zeros(7, np.float32)}))


def nan_value(path, _root):
    def change(meta, arrays):
        name = first_value(arrays)
        arrays[name] = arrays[name].copy()
        arrays[name][3] = np.nan
    rewrite(path, change)


def another_jobs_file(path, root):
    other = write(root, table(job="other-job", steps=6))
    shutil.copyfile(other, path)


def another_shards_file(path, root):
    other = write(root, table(shard=1, steps=6))
    shutil.copyfile(other, path)


def negative_version(path, _root):
    def change(meta, arrays):
        meta["version"] = -6
        meta["policy"]["version"] = -6
    rewrite(path, change)


def missing_optimizer_state(path, _root):
    def change(meta, arrays):
        del arrays[min(name for name in arrays if name.startswith("state.") and name.endswith(".v"))]
    rewrite(path, change)


def meta_not_json(path, _root):
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["meta"] = np.frombuffer(b"{not json", np.uint8)
    np.savez(path, **arrays)


def pickled_array(path, _root):
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    arrays[first_value(arrays)] = np.array([{"a": 1}], dtype=object)
    np.savez(path, **arrays)


DAMAGES = [
    (truncate, "unreadable"),
    (flip_byte, "checksum"),               # caught by the zip's own CRC-32 as the array is read
    (same_zip_other_bytes, "checksum"),
    (wrong_size, "value."),
    (nan_value, "not finite"),
    (another_jobs_file, "meta.job"),
    (another_shards_file, "meta.shard_id"),
    (negative_version, "meta.version"),
    (missing_optimizer_state, "lacks 'v'"),
    (meta_not_json, "meta: not JSON"),
    (pickled_array, "unreadable"),
]


@pytest.mark.parametrize("damage, words", DAMAGES, ids=[d.__name__ for d, _ in DAMAGES])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_older_one(two, tmp_path, skipped, damage, words):
    directory, older, newest = two
    damage(newest, tmp_path)
    with pytest.raises(BadCheckpoint) as refused:
        checkpoint.load(newest, job=JOB, shard_id=0)
    assert words in refused.value.reason
    loaded = checkpoint.load_newest_valid(directory, job=JOB, shard_id=0)
    assert loaded is not None and loaded.version == 3 and loaded.path == checkpoint.path_of(directory, 3)
    for sid, value in older.values.items():
        np.testing.assert_array_equal(loaded.values[sid], value)
    [record] = skipped
    assert record.getMessage() == "checkpoint skipped"
    assert record.path == str(newest) and record.why == refused.value.reason and record.job == JOB


def test_every_checkpoint_bad_gives_none_and_a_line_for_each(two, tmp_path, skipped):
    directory, _older, newest = two
    truncate(newest, tmp_path)
    nan_value(checkpoint.path_of(directory, 3), tmp_path)
    assert checkpoint.load_newest_valid(directory, job=JOB, shard_id=0) is None
    assert [(r.path.rsplit("/", 1)[1], r.why.split(":")[0]) for r in skipped] == [
        ("ckpt-000000000006.npz", "unreadable"), ("ckpt-000000000003.npz", "array value.0")]


def test_a_checkpoint_of_another_plan_is_refused_when_the_plan_is_known(two):
    directory, _older, newest = two
    other = make_plan({"w": ((64, 8), "float32"), "b": ((8,), "float32"), "mean": ((8,), "float32")}, 2, 512)
    with pytest.raises(BadCheckpoint, match="meta.plan"):
        checkpoint.load(newest, job=JOB, shard_id=0, plan=other)
    assert checkpoint.load(newest, job=JOB, shard_id=0, plan=PLAN).version == 6


@pytest.mark.parametrize("kind, keys", [("momentum", {"v"}), ("adam", {"m", "v", "t"}), ("sgd", set())])
def test_a_round_trip_gives_back_the_table_and_validate_agrees(tmp_path, kind, keys):
    t = table(optimizer=kind, steps=4)
    path = write(tmp_path, t)
    assert checkpoint.validate(path, job=JOB, shard_id=0, plan=PLAN) == 4
    loaded = checkpoint.load(path, job=JOB, shard_id=0, plan=PLAN)
    back = checkpoint.build_table(loaded, 0)
    assert back.version == 4 and back.policy.clocks == {"w0": 4} and back.learned == t.learned
    for sid in t.held:
        np.testing.assert_array_equal(back.values[sid], t.values[sid])
    for sid in t.learned:
        assert set(back.opt_state[sid]) == keys
        for key, arr in t.opt_state[sid].items():
            np.testing.assert_array_equal(back.opt_state[sid][key], arr)
    # the meta records every array: name, shape, dtype, checksum
    meta, _values, _state = checkpoint.read(path)
    assert meta["arrays"]["value.0"]["dtype"] == "float32" and isinstance(meta["arrays"]["value.0"]["crc32"], int)


def test_missing_adam_step_count_is_refused(two):
    _directory, _older, newest = two
    rewrite(newest, lambda meta, arrays: arrays.pop(min(n for n in arrays if n.endswith(".t"))))
    with pytest.raises(BadCheckpoint, match="lacks 't'"):
        checkpoint.load(newest, job=JOB, shard_id=0)


def test_versions_lists_complete_files_only_and_writes_keep_three(tmp_path):
    t = table(steps=0)
    directory = checkpoint.job_dir(tmp_path, JOB, 0)
    for step in range(5):
        t.policy.on_push("w0", step, ("push", step))
        write(tmp_path, t)
    (directory / ".tmp-999-ckpt-000000000099.npz").write_bytes(b"PK\x03\x04 half")
    assert checkpoint.versions(directory) == [3, 4, 5][-checkpoint.KEEP_CHECKPOINTS:]
    assert checkpoint.remove_temporaries(directory) == 1
    assert checkpoint.versions(tmp_path / "nowhere") == []


def test_a_write_deletes_the_newer_versions_of_a_history_left_behind(tmp_path):
    t = table(steps=6)
    write(tmp_path, t)
    directory = checkpoint.job_dir(tmp_path, JOB, 0)
    back = table(steps=4)  # the job was rolled back to 4 and goes on from there
    written = checkpoint.write(tmp_path, checkpoint.snapshot_of(back))
    assert written.deleted == [6] and checkpoint.versions(directory) == [4]
    assert checkpoint.prune_newer(directory, 1) == [4] and checkpoint.versions(directory) == []


def test_a_write_keeps_the_versions_it_is_told_to_protect(tmp_path):
    t = table(steps=0)
    directory = checkpoint.job_dir(tmp_path, JOB, 0)
    for step in range(6):
        t.policy.on_push("w0", step, ("push", step))
        written = checkpoint.write(tmp_path, checkpoint.snapshot_of(t), protect=(2,))
    assert checkpoint.versions(directory) == [2, 4, 5, 6] and written.deleted == [3]


# --- the writer thread and the snapshot (ps/checkpoint_writer.py) ---------------------------------------


def take_done(writer, count: int) -> list:
    """The writer's next `count` finished tasks; waits on its pipe (bounded), never sleeps."""
    import select

    done: list = []
    while len(done) < count:
        readable, _, _ = select.select([writer.fileno()], [], [], 10)
        assert readable, f"the writer finished {len(done)} of {count} tasks within 10 s"
        done += writer.take_done()
    return done


def test_a_snapshot_keeps_the_cut_while_the_table_moves_on():
    from ps.checkpoint_writer import take_snapshot

    t = table(optimizer="momentum", steps=2)
    before = {sid: v.copy() for sid, v in t.values.items()}
    velocity = {sid: st["v"].copy() for sid, st in t.opt_state.items()}
    snap, pin = take_snapshot(t)
    t.apply([SliceData(sid, np.full(s.count, 5.0, np.float32)) for sid, s in t.held.items()], step=2)
    assert snap.version == 2 and snap.meta["policy"]["clocks"] == {"w0": 2}
    for sid in t.held:
        np.testing.assert_array_equal(snap.values[sid], before[sid])   # copied on write, not changed
        assert not np.array_equal(t.values[sid], before[sid])
    for sid in t.learned:
        np.testing.assert_array_equal(snap.state[sid]["v"], velocity[sid])
    copies = t.copies_on_write
    pin.done = True  # written: the next update is in place again
    t.apply([SliceData(sid, np.full(s.count, 5.0, np.float32)) for sid, s in t.held.items()], step=3)
    assert t.copies_on_write == copies


def test_the_writer_keeps_only_the_newest_snapshot_waiting_behind_a_write(tmp_path):
    import threading

    from ps.checkpoint_writer import BARRIER, CheckpointWriter, Task, take_snapshot

    busy, release = threading.Event(), threading.Event()

    class Gated(CheckpointWriter):
        """A writer whose task of job "hold" takes until the test releases it (a long write)."""

        def _do(self, task):
            if task.job == "hold":
                busy.set()
                release.wait(10)
            super()._do(task)

    writer = Gated(tmp_path, 0)
    writer.start()
    try:
        writer.submit(Task(BARRIER, "hold"))
        assert busy.wait(10), "the writer did not start its task"
        t = table(steps=2)
        answered = []
        first = writer.write(*take_snapshot(t), waiter=lambda task: answered.append(("first", task.version)))
        t.policy.on_push("w0", 2, ("push", 2))
        second = writer.write(*take_snapshot(t), waiter=lambda task: answered.append(("second", task.version)))
        other = writer.write(*take_snapshot(table(job="other-job", steps=1)))
        assert second is first and other is not first  # waiting behind "hold": the newer took its place
        release.set()
        done = take_done(writer, 3)
    finally:
        release.set()
        assert writer.close(10)
    assert [(task.kind, task.job, task.version) for task in done] == [
        ("barrier", "hold", -1), ("write", JOB, 3), ("write", "other-job", 1)]
    for waiter in done[1].waiters:
        waiter(done[1])
    assert answered == [("first", 3), ("second", 3)]
    assert checkpoint.versions(checkpoint.job_dir(tmp_path, JOB, 0)) == [3]


def test_a_snapshot_handed_to_an_idle_writer_is_always_written(tmp_path):
    from ps.checkpoint_writer import CheckpointWriter, take_snapshot

    writer = CheckpointWriter(tmp_path, 0)  # not started: nothing in progress
    t = table(steps=2)
    first = writer.write(*take_snapshot(t))
    t.policy.on_push("w0", 2, ("push", 2))
    second = writer.write(*take_snapshot(t))
    assert second is not first
    writer.start()
    try:
        done = take_done(writer, 2)
    finally:
        assert writer.close(10)
    assert [task.version for task in done] == [2, 3] and not any(task.error for task in done)
    assert checkpoint.versions(checkpoint.job_dir(tmp_path, JOB, 0)) == [2, 3]
