"""The scheduler's state dir, checked at start: a store it cannot trust is refused, one bad row hides no other job.

Every case is a real `psctl scheduler` process on a real state dir: a store
written by a real scheduler (jobs submitted with no servers or workers, so
they stay queued), then damaged on disk the way it happens to operators (a
partial restore, a flipped page, the wrong file), then started again. A
refusal is exit 1 (like the command's other startup errors: a port in use,
an unusable state dir), one `Error:` sentence naming the state dir, no
READY line, and the file left as it was.
"""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.procs import ProcGroup
from tests.test_jobs import job_file, psctl_json, status, wait_until

STORE = "jobs.sqlite3"
EXIT_S = 30.0  # a refused start exits at once; generous for a loaded 2-core machine


def make_store(procs: ProcGroup, tmp_path: Path, *, jobs: int = 2, stop: int = signal.SIGTERM,
               **spec) -> tuple[Path, list[str]]:
    """A state dir with `jobs` queued jobs, written by a real scheduler; the dir and the job ids.

    SIGTERM closes the store (its WAL merged into the file); SIGKILL leaves
    the jobs' writes in jobs.sqlite3-wal, as a crash or a power cut does.
    """
    state = tmp_path / "state"
    sched = procs.start("scheduler", "--state-dir", str(state))
    addr = sched.ready["addr"]
    ids = [psctl_json("submit", job_file(tmp_path, f"job{k}.yaml", name=f"job{k}", workers=1, steps=20, **spec),
                      "--scheduler", addr)["job"] for k in range(jobs)]
    sched.signal(stop)
    sched.wait(timeout=EXIT_S)
    return state, ids


def start_and_list(procs: ProcGroup, state: Path) -> tuple[str, list[tuple[str, str]], object]:
    """Start a scheduler on `state`: its address, the jobs `psctl list` shows (id, state), the process."""
    sched = procs.start("scheduler", "--state-dir", str(state))
    addr = sched.ready["addr"]
    listed = psctl_json("list", "--scheduler", addr)["jobs"]
    return addr, sorted((j["id"], j["state"]) for j in listed), sched


def refused(procs: ProcGroup, state: Path, *fragments: str) -> str:
    """Start a scheduler on `state` and check it refuses: exit 1, one sentence naming the dir, no READY; that line."""
    sched = procs.start("scheduler", "--state-dir", str(state), ready=False)
    code = sched.wait(timeout=EXIT_S)
    stdout, stderr = sched.read_rest(timeout=EXIT_S), sched.stderr()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 1, f"exit {code}:\n{stderr}"
    assert "READY" not in stdout and "Traceback" not in stderr, stdout + stderr
    assert len(lines) == 1 and lines[0].startswith(f"Error: state dir {state}: {STORE} "), stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr
    return lines[0]


def page_of(path: Path, name: str) -> tuple[int, int]:
    """Where the b-tree `name` (a table or an index) starts in the file: (byte offset of its root page, page size)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    return (root - 1) * size, size


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# --- a healthy store, old or new, starts with every job ----------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["closed", "killed, jobs in the WAL"])
def test_a_store_with_two_jobs_survives_a_restart_with_both(procs, tmp_path, stop):
    state, ids = make_store(procs, tmp_path, stop=stop)
    _, listed, _ = start_and_list(procs, state)
    assert listed == [(job, "queued") for job in sorted(ids)]


def test_a_brand_new_state_dir_starts_and_is_stamped_as_ours(procs, tmp_path):
    _, listed, sched = start_and_list(procs, tmp_path / "new" / "state")
    assert listed == []
    sched.stop()
    with sqlite3.connect(tmp_path / "new" / "state" / STORE) as db:
        stamp = db.execute("PRAGMA application_id").fetchone()[0], db.execute("PRAGMA user_version").fetchone()[0]
    db.close()
    assert stamp == (0x7073636C, 1)


@pytest.mark.parametrize("older", [False, True], ids=["as main wrote it", "before submission ids and events"])
def test_a_store_from_before_the_schema_stamp_is_migrated_with_its_jobs(procs, tmp_path, older):
    state, ids = make_store(procs, tmp_path)
    with sqlite3.connect(state / STORE) as db:  # take the stamp (and, older, the later columns) off again
        db.execute("PRAGMA application_id = 0")
        db.execute("PRAGMA user_version = 0")
        if older:
            db.execute("DROP TABLE events")
            db.execute("ALTER TABLE jobs DROP COLUMN submission_id")
    db.close()
    _, listed, sched = start_and_list(procs, state)
    assert listed == [(job, "queued") for job in sorted(ids)]
    sched.stop()
    with sqlite3.connect(state / STORE) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert {"submission_id"} <= {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'events'").fetchone()
    db.close()


# --- a store that would lie is refused, and left as it was ----------------------------------------------------


@pytest.mark.parametrize("how", ["empty", "missing"])
def test_a_missing_or_empty_file_beside_its_wal_is_refused_and_the_wal_kept(procs, tmp_path, how):
    state, _ = make_store(procs, tmp_path, stop=signal.SIGKILL)  # the jobs are only in the WAL
    wal = (state / f"{STORE}-wal").read_bytes()
    assert wal
    if how == "empty":
        (state / STORE).write_bytes(b"")
    else:
        (state / STORE).unlink()
    line = refused(procs, state, f"is {how} but {STORE}-wal", "restore", "to start with no jobs")
    assert f"move {STORE}-wal and {STORE}-shm out of {state}" in line
    assert (state / f"{STORE}-wal").read_bytes() == wal  # sqlite, left to open it, deletes it


def test_garbage_in_place_of_the_file_is_refused(procs, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    garbage = random.Random(7).randbytes(64 * 1024)
    (state / STORE).write_bytes(garbage)
    refused(procs, state, "is not a sqlite database or is damaged", "restore it from a backup",
            f"move {STORE}* out of {state} to start with no jobs")
    assert (state / STORE).read_bytes() == garbage


FLIPS = {  # where in the jobs table's page, what is written there
    "page type": (0, b"\xff"),
    "cell pointers": (8, b"\xff" * 4),
    "page zeroed": (0, bytes(4096)),
    "page of noise": (0, random.Random(7).randbytes(4096)),
}


@pytest.mark.parametrize("flip", FLIPS)
def test_a_flipped_page_of_the_jobs_table_is_refused(procs, tmp_path, flip):
    # (A flip inside a row's text leaves the pages sound: that row is skipped, see the bad-row test below.)
    state, _ = make_store(procs, tmp_path)
    offset, size = page_of(state / STORE, "jobs")
    where, data = FLIPS[flip]
    assert where + len(data) <= size
    overwrite(state / STORE, offset + where, data)
    refused(procs, state, "damaged", "restore it from a backup")


def test_an_index_that_disagrees_with_the_jobs_table_is_refused(procs, tmp_path):
    # quick_check passes this one (it reads every page but matches no index against its table); update()
    # finds a job through this index, so the job whose key changed would silently lose every later write.
    state, ids = make_store(procs, tmp_path)
    offset, size = page_of(state / STORE, "sqlite_autoindex_jobs_1")  # the primary key, jobs.id
    page = (state / STORE).read_bytes()[offset:offset + size]
    key = page.find(ids[-1].encode())
    assert key > 0
    overwrite(state / STORE, offset + key + len(ids[-1]) - 1, b"9")
    refused(procs, state, "is damaged (sqlite's integrity check: row 2 missing from index")


def another_apps_file(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (name TEXT, email TEXT)")
        db.execute("INSERT INTO users VALUES ('ada', 'ada@example.com')")
    db.close()


def a_jobs_table_of_another_shape(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, command TEXT, cron TEXT)")
    db.close()


def another_application_id(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA application_id = {0xF055EE1}")  # any stamp that is not ours
        db.execute("CREATE TABLE jobs (id TEXT)")
    db.close()


@pytest.mark.parametrize("make, fragment", [
    (another_apps_file, "is not a pscluster job store (its tables: users)"),
    (a_jobs_table_of_another_shape, "is not a pscluster job store (table jobs lacks "),
    (another_application_id, "belongs to another application (sqlite application_id 0xf055ee1)"),
], ids=["other tables", "a jobs table of another shape", "another application id"])
def test_another_applications_sqlite_file_is_refused_and_not_written(procs, tmp_path, make, fragment):
    state = tmp_path / "state"
    state.mkdir()
    make(state / STORE)
    before = (state / STORE).read_bytes()
    refused(procs, state, fragment, "point --state-dir at the scheduler's own directory")
    assert (state / STORE).read_bytes() == before  # no tables of ours added, not switched to WAL
    assert not (state / f"{STORE}-wal").exists()


@pytest.mark.parametrize("change,fragment", [
    ("PRAGMA user_version = 2", "was written by a newer pscluster (schema version 2, this one reads up to 1)"),
    ("ALTER TABLE jobs DROP COLUMN error", "is a pscluster job store with a damaged schema (table jobs lacks error)"),
], ids=["newer-schema", "missing-column"])
def test_a_store_of_another_schema_is_refused(procs, tmp_path, change, fragment):
    state, _ = make_store(procs, tmp_path)
    with sqlite3.connect(state / STORE) as db:
        db.execute(change)
    db.close()
    refused(procs, state, fragment)


def test_a_directory_in_place_of_the_file_is_refused(procs, tmp_path):
    state = tmp_path / "state"
    (state / STORE).mkdir(parents=True)
    refused(procs, state, "is a directory", f"move it out of {state}")


def lock_out(path: Path) -> tuple[list[str], str]:
    """Make `path` impossible for this user to open for writing: the command that undoes it, and the OS's words.

    chmod 0 for a user; root ignores modes, so for root the file is made
    immutable (chattr +i), which root cannot write either; skipped where that
    is not available (no chattr, a filesystem or a container that refuses it).
    """
    if os.geteuid() != 0:
        path.chmod(0)
        return ["chmod", "600", str(path)], "Permission denied"
    try:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, timeout=EXIT_S)
    except FileNotFoundError:
        done = None
    if done is None or done.returncode != 0:
        pytest.skip("as root, modes do not lock a file out and chattr +i is not available here")
    return ["chattr", "-i", str(path)], "Operation not permitted"


def test_a_file_this_user_cannot_open_is_refused(procs, tmp_path):
    state, _ = make_store(procs, tmp_path)
    undo, words = lock_out(state / STORE)
    try:
        refused(procs, state, f"cannot be opened for reading and writing ({words})", f"uid {os.geteuid()}")
    finally:
        subprocess.run(undo, check=True, timeout=EXIT_S)


# --- one bad row ------------------------------------------------------------------------------------------------


BAD_ROWS = {  # job number (1-based) -> how its row is spoiled, what the log says about it
    2: ("UPDATE jobs SET spec = '{\"name\": \"job1\", ' WHERE seq = ?", "JSONDecodeError"),
    4: ("UPDATE jobs SET state = 'exploded' WHERE seq = ?", "'exploded' is not a valid JobState"),
    5: ("UPDATE jobs SET spec = CAST(x'7b22c3' AS TEXT) WHERE seq = ?", "UnicodeDecodeError"),  # cut UTF-8
}


def test_bad_rows_are_skipped_logged_and_kept_and_the_good_jobs_run(procs, tmp_path):
    state, ids = make_store(procs, tmp_path, jobs=5)
    with sqlite3.connect(state / STORE) as db:
        for seq, (sql, _) in BAD_ROWS.items():
            db.execute(sql, (seq,))
    db.close()
    good = [job for k, job in enumerate(ids, 1) if k not in BAD_ROWS]
    addr, listed, sched = start_and_list(procs, state)
    assert listed == [(job, "queued") for job in sorted(good)]
    log = sched.stderr()  # written before READY: the store is read before the scheduler listens
    for seq, (_, why) in BAD_ROWS.items():
        [line] = [line for line in log.splitlines() if f"job={ids[seq - 1]} " in line]
        assert "job store row skipped" in line and why in line, log
    # A new job is numbered after the bad rows it cannot see (the last one is number 5), not onto one of them.
    new = psctl_json("submit", job_file(tmp_path, "new.yaml", name="new", workers=1, steps=20),
                     "--scheduler", addr)["job"]
    assert new == "new-6"
    procs.server(0, "--scheduler", addr)
    procs.start("worker", "--scheduler", addr)
    for job in [*good, new]:
        wait_until(lambda job=job: status(addr, job)["state"] == "succeeded", what=f"{job} succeeded")
    sched.stop()
    with sqlite3.connect(state / STORE) as db:  # the bad rows are still there, as they were, for the operator
        kept = dict(db.execute("SELECT seq, state FROM jobs WHERE seq IN (2, 4, 5)").fetchall())
    db.close()
    assert kept == {2: "queued", 4: "exploded", 5: "queued"}
