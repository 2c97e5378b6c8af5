"""The scheduler's durable job registry: sqlite3 in WAL mode under --state-dir.

A submission is committed (and fsync'd: synchronous=FULL) before the
scheduler acknowledges it, so an acknowledged job survives kill -9 of the
scheduler. Everything else the scheduler knows (live workers, shards,
assignments) is rebuilt from heartbeats after a restart.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

# Job states. A job moves queued -> running -> (succeeded | failed | cancelled);
# a scheduler restart puts running jobs back to queued (they resume).
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id         TEXT PRIMARY KEY,
    seq        INTEGER NOT NULL UNIQUE,
    name       TEXT NOT NULL,
    state      TEXT NOT NULL,
    spec       TEXT NOT NULL,
    tensors    TEXT NOT NULL,
    nonlearned TEXT NOT NULL,
    submitted  REAL NOT NULL,
    started    REAL,
    finished   REAL,
    plan       TEXT,
    shards     TEXT,
    progress   TEXT NOT NULL DEFAULT '{}',
    result     TEXT NOT NULL DEFAULT '{}',
    error      TEXT NOT NULL DEFAULT ''
)
"""

_META_SCHEMA = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"

_JSON_COLUMNS = ("spec", "tensors", "nonlearned", "plan", "shards", "progress", "result")


class Registry:
    """Jobs on disk. Single-threaded use (the scheduler's loop)."""

    def __init__(self, state_dir: str | Path):
        path = Path(state_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / "jobs.sqlite3"
        self.db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions below
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(_SCHEMA)
        self.db.execute(_META_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def _row(self, row: sqlite3.Row | None) -> dict | None:
        if row is None:
            return None
        job = dict(row)
        for col in _JSON_COLUMNS:
            job[col] = json.loads(job[col]) if job[col] is not None else None
        return job

    def next_incarnation(self) -> int:
        """Count scheduler starts on this state dir (1, 2, ...), durably."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT value FROM meta WHERE key = 'incarnation'").fetchone()
            value = (row[0] if row else 0) + 1
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('incarnation', ?)", (value,))
        return value

    def submit(self, spec: dict, tensors: list, nonlearned: list) -> str:
        """Store a new queued job; returns its id once it is committed to disk."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            job_id = f"{spec['name']}-{seq}"
            self.db.execute(
                "INSERT INTO jobs (id, seq, name, state, spec, tensors, nonlearned, submitted) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, seq, spec["name"], QUEUED, json.dumps(spec), json.dumps(tensors),
                 json.dumps(nonlearned), time.time()))
        return job_id

    def get(self, job_id: str) -> dict | None:
        return self._row(self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def all(self) -> list[dict]:
        """Every job, newest first."""
        return [self._row(r) for r in self.db.execute("SELECT * FROM jobs ORDER BY seq DESC")]

    def in_state(self, *states: str) -> list[dict]:
        """Jobs in any of `states`, oldest first (the scheduling order)."""
        marks = ",".join("?" * len(states))
        return [self._row(r) for r in self.db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq",
                                                      states)]

    def update(self, job_id: str, **fields) -> None:
        """Set columns of one job (JSON columns take Python values)."""
        if not fields:
            return
        cols, values = [], []
        for key, value in fields.items():
            cols.append(f"{key} = ?")
            values.append(json.dumps(value) if key in _JSON_COLUMNS else value)
        with self.db:
            self.db.execute(f"UPDATE jobs SET {', '.join(cols)} WHERE id = ?", (*values, job_id))

    def requeue_running(self) -> list[str]:
        """After a restart: jobs left running go back to queued (their progress is kept)."""
        ids = [r["id"] for r in self.db.execute("SELECT id FROM jobs WHERE state = ?", (RUNNING,))]
        with self.db:
            self.db.execute("UPDATE jobs SET state = ? WHERE state = ?", (QUEUED, RUNNING))
        return ids
