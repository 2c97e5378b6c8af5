"""The scheduler's durable job store: sqlite3 in WAL mode under --state-dir.

A submission is committed (and fsync'd: synchronous=FULL) before the
scheduler acknowledges it, so an acknowledged job survives kill -9 of the
scheduler. The store only reads and writes rows: what a job means lives in
the scheduler's state machine (ps/sched/), which gets every row at start
(`load`) and sends back what to write (`insert`, `update`). Everything
else the scheduler knows (live workers, shards, who holds which partition)
is rebuilt from registrations and heartbeats after a restart.
"""
from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

from protocol.errors import ProtocolError
from protocol.jobspec import validate_job
from protocol.jobstate import JobState
from protocol.plan import Plan
from ps.sched.jobs import JobRecord

log = logging.getLogger("pscluster.scheduler")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id            TEXT PRIMARY KEY,
    seq           INTEGER NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    state         TEXT NOT NULL,
    spec          TEXT NOT NULL,
    tensors       TEXT NOT NULL,
    nonlearned    TEXT NOT NULL,
    submitted     REAL NOT NULL,
    started       REAL,
    finished      REAL,
    plan          TEXT,
    shards        TEXT,
    progress      TEXT NOT NULL DEFAULT '{}',
    result        TEXT NOT NULL DEFAULT '{}',
    error         TEXT NOT NULL DEFAULT '',
    submission_id TEXT NOT NULL DEFAULT ''
)
"""
_META_SCHEMA = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"
# Each job's history (`psctl logs`): what the scheduler decided and saw, in order.
_EVENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq   INTEGER PRIMARY KEY AUTOINCREMENT,
    job   TEXT NOT NULL,
    ts    REAL NOT NULL,
    kind  TEXT NOT NULL,
    text  TEXT NOT NULL,
    facts TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job, seq);
"""
_JSON_COLUMNS = ("spec", "tensors", "nonlearned", "plan", "shards", "progress", "result")
_COLUMNS = ("id", "seq", "name", "state", "spec", "tensors", "nonlearned", "submitted", "started", "finished",
            "plan", "shards", "progress", "result", "error", "submission_id")


class JobStore:
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
        self.db.executescript(_EVENTS_SCHEMA)
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(jobs)")}
        if "submission_id" not in columns:  # a store from before idempotent submits
            self.db.execute("ALTER TABLE jobs ADD COLUMN submission_id TEXT NOT NULL DEFAULT ''")

    def close(self) -> None:
        self.db.close()

    def next_incarnation(self) -> int:
        """Count scheduler starts on this state dir (1, 2, ...), durably."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            row = self.db.execute("SELECT value FROM meta WHERE key = 'incarnation'").fetchone()
            value = (row[0] if row else 0) + 1
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('incarnation', ?)", (value,))
        return value

    def load(self) -> list[JobRecord]:
        """Every job, oldest first; jobs a previous scheduler left running come back queued.

        A row that cannot be read (bad JSON, a wrong type, an unknown state)
        is skipped with a log line: one bad row must not hide the others.
        """
        records = []
        for row in self.db.execute("SELECT * FROM jobs ORDER BY seq"):
            try:
                record = _record(row)
            except (ValueError, TypeError, KeyError, ProtocolError) as exc:
                log.error("job store row skipped: it cannot be read",
                          extra={"job": str(row["id"])[:80], "why": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            if record.state is JobState.RUNNING:
                record.state = JobState.QUEUED
                self.update(record.id, {"state": JobState.QUEUED.value})
                log.info("job left running by a previous scheduler is queued again", extra={"job": record.id})
            records.append(record)
        return records

    def insert(self, row: dict) -> None:
        """Store a new job; returns once it is committed to disk."""
        values = [json.dumps(row[c]) if c in _JSON_COLUMNS else row[c] for c in _COLUMNS]
        with self.db:
            self.db.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                            values)

    def update(self, job_id: str, fields: dict) -> None:
        """Set columns of one job (JSON columns take Python values)."""
        fields = {k: v for k, v in fields.items() if k in _COLUMNS and k != "id"}
        if not fields:
            return
        cols = [f"{key} = ?" for key in fields]
        values = [json.dumps(v) if k in _JSON_COLUMNS else v for k, v in fields.items()]
        with self.db:
            self.db.execute(f"UPDATE jobs SET {', '.join(cols)} WHERE id = ?", (*values, job_id))


    def add_events(self, notes: list) -> None:
        """Append job events (ps/sched/events.py `Note`s) in one transaction."""
        if not notes:
            return
        with self.db:
            self.db.executemany("INSERT INTO events (job, ts, kind, text, facts) VALUES (?, ?, ?, ?, ?)",
                                [(n.job, n.ts, n.kind, n.text, json.dumps(n.facts, default=str)) for n in notes])

    def events(self, job: str, after: int, limit: int) -> list[dict]:
        """Job `job`'s events numbered above `after`, oldest first, at most `limit`."""
        rows = self.db.execute("SELECT seq, ts, kind, text, facts FROM events WHERE job = ? AND seq > ? "
                               "ORDER BY seq LIMIT ?", (job, after, limit))
        out = []
        for row in rows:
            try:
                facts = json.loads(row["facts"])
            except ValueError:
                facts = {}
            out.append({**(facts if isinstance(facts, dict) else {}), "seq": row["seq"], "ts": row["ts"],
                        "kind": row["kind"], "text": row["text"]})
        return out


def _record(row: sqlite3.Row) -> JobRecord:
    data = dict(row)
    for col in _JSON_COLUMNS:
        data[col] = json.loads(data[col]) if data[col] is not None else None
    record = JobRecord(
        id=str(data["id"]), seq=int(data["seq"]), name=str(data["name"]), state=JobState(data["state"]),
        spec=data["spec"], submitted=float(data["submitted"]),
        started=None if data["started"] is None else float(data["started"]),
        finished=None if data["finished"] is None else float(data["finished"]),
        plan=data["plan"], shards=data["shards"] or [], tensors=data["tensors"] or [],
        nonlearned=data["nonlearned"] or [], progress=data["progress"] or {}, result=data["result"] or {},
        error=str(data["error"] or ""), submission_id=str(data["submission_id"] or ""))
    for name, kind in (("spec", dict), ("shards", list), ("tensors", list), ("nonlearned", list),
                       ("progress", dict), ("result", dict)):
        if not isinstance(getattr(record, name), kind):
            raise TypeError(f"{name} must be a {kind.__name__}")
    if record.plan is not None:
        Plan.from_wire(record.plan)
    record.spec = validate_job(record.spec)
    return record
