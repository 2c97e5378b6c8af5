"""The scheduler's durable job store: sqlite3 in WAL mode under --state-dir.

A submission is committed (and fsync'd: synchronous=FULL) before the
scheduler acknowledges it, so an acknowledged job survives kill -9 of the
scheduler. The store only reads and writes rows: what a job means lives in
the scheduler's state machine (ps/sched/), which gets every row at start
(`load`) and sends back what to write (`insert`, `update`). Everything
else the scheduler knows (live workers, shards, who holds which partition)
is rebuilt from registrations and heartbeats after a restart.

Opening refuses a store that would lie (`StoreError`, one sentence for the
operator): a database file missing or empty beside its WAL, a damaged file
(sqlite's quick_check, and integrity_check of the jobs table), a file of
another application or a schema this version does not know, a directory or
an unreadable file in its place. None of these is modified by the refusal.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
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
)
"""
_EVENTS_INDEX = "CREATE INDEX IF NOT EXISTS events_by_job ON events (job, seq)"
_JSON_COLUMNS = ("spec", "tensors", "nonlearned", "plan", "shards", "progress", "result")
_COLUMNS = ("id", "seq", "name", "state", "spec", "tensors", "nonlearned", "submitted", "started", "finished",
            "plan", "shards", "progress", "result", "error", "submission_id")

STORE_FILE = "jobs.sqlite3"
# PRAGMA application_id ("pscl"): tells our file from another program's sqlite file, whatever its tables.
APPLICATION_ID = 0x7073636C
# PRAGMA user_version: the schema below. Stores written before it was set have 0 and are migrated (`_adopt`).
SCHEMA_VERSION = 1
# What each table must have for the code below to read and write it.
_TABLES = {"jobs": frozenset(_COLUMNS), "meta": frozenset({"key", "value"}),
           "events": frozenset({"seq", "job", "ts", "kind", "text", "facts"})}
# An unstamped store from before idempotent submits (no submission_id) or job events (no events table) is ours too.
_LEGACY_OPTIONAL = {"jobs": frozenset({"submission_id"})}
_REMEDY_RESTORE = "restore it from a backup, or move {name}* out of {dir} to start with no jobs"


class StoreError(Exception):
    """The job store cannot be used as it is; the message is one sentence for the operator."""


class JobStore:
    """Jobs on disk. Single-threaded use (the scheduler's loop)."""

    def __init__(self, state_dir: str | Path):
        path = Path(state_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / STORE_FILE
        self.db = _open_checked(path, self.path)

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

        A row that cannot be read (bad JSON or UTF-8, a wrong type, an unknown
        state) is skipped with a log line naming it, and stays in the store
        for the operator: one bad row must not hide the others.
        """
        # Text comes as bytes and is decoded row by row, inside the try: sqlite3 decoding it would raise
        # for one row's bad UTF-8 (a flipped bit no page check sees) in the middle of the whole query.
        self.db.text_factory = bytes
        try:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        finally:
            self.db.text_factory = str
        records = []
        for row in rows:
            try:
                record = _record({key: _text(row[key]) for key in row.keys()})
            except (ValueError, TypeError, KeyError, ProtocolError) as exc:
                job = row["id"].decode(errors="replace") if isinstance(row["id"], bytes) else str(row["id"])
                log.error("job store row skipped: it cannot be read (the row is kept)",
                          extra={"job": job[:80], "why": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            if record.state is JobState.RUNNING:
                record.state = JobState.QUEUED
                self.update(record.id, {"state": JobState.QUEUED.value})
                log.info("job left running by a previous scheduler is queued again", extra={"job": record.id})
            records.append(record)
        return records

    def last_seq(self) -> int:
        """The highest job number in the store, rows `load` skipped included (0 when none)."""
        row = self.db.execute("SELECT MAX(seq) FROM jobs WHERE typeof(seq) = 'integer'").fetchone()
        return row[0] or 0

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


def _text(value):
    """A cell fetched with text_factory=bytes, as sqlite3 would give it (UnicodeDecodeError is a ValueError)."""
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _record(data: dict) -> JobRecord:
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


# --- opening, checked -------------------------------------------------------------------------------------------


def _open_checked(state_dir: Path, path: Path) -> sqlite3.Connection:
    """The store's connection, its schema current; StoreError (nothing changed on disk) when it would lie."""
    _check_files(state_dir, path)
    try:
        db = sqlite3.connect(path, isolation_level=None)  # explicit transactions
    except sqlite3.Error as exc:
        raise _access_error(state_dir, path, exc) from None
    try:
        db.row_factory = sqlite3.Row
        _check_pages(state_dir, path, db)
        adopt = _check_schema(state_dir, path, db)  # reads only: a refused file is left as it was
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        if adopt:
            _adopt(db)
        return db
    except StoreError:
        db.close()
        raise
    except sqlite3.OperationalError as exc:  # cannot open, read-only, locked, I/O error: the file may be fine
        db.close()
        raise _access_error(state_dir, path, exc) from None
    except sqlite3.DatabaseError as exc:     # SQLITE_CORRUPT, SQLITE_NOTADB: the file is not a sound database
        db.close()
        raise _refusal(state_dir, path, f"is not a sqlite database or is damaged (sqlite: {exc})",
                       _REMEDY_RESTORE) from None


def _check_files(state_dir: Path, path: Path) -> None:
    """What can be told before sqlite opens the file, which it would change in some of these cases."""
    try:
        info = path.stat()
    except FileNotFoundError:
        info = None
    if info is not None and not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise _refusal(state_dir, path, f"is {kind}, where the job store file should be",
                       "move it out of {dir} to start with no jobs, or point --state-dir at the scheduler's own "
                       "directory")
    if info is None or info.st_size == 0:
        # sqlite would take a missing or empty file for a new database and delete the WAL beside it, and with it
        # every job not yet copied into the main file (all of them, for a store under ~1000 pages of writes).
        sidecars = [side for side in (f"{path.name}-wal", f"{path.name}-shm") if (state_dir / side).exists()]
        if sidecars:
            state = "missing" if info is None else "empty"
            holds = "hold" if len(sidecars) > 1 else "holds"
            raise _refusal(state_dir, path, f"is {state} but {' and '.join(sidecars)} beside it {holds} writes "
                                            "that belong to it (opening it would discard them)",
                           "restore all of {name}* from one backup, or move " + " and ".join(sidecars)
                           + " out of {dir} to start with no jobs")
        return
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError as exc:
        raise _refusal(state_dir, path, f"cannot be opened for reading and writing ({exc.strerror})",
                       f"let this user (uid {os.geteuid()}) read and write it and create files in {{dir}}") from None


def _check_pages(state_dir: Path, path: Path, db: sqlite3.Connection) -> None:
    """sqlite's own checks: every page of the file, and the jobs table against its indexes.

    quick_check reads every page once (~7 ms for 1,000 jobs, 6 MiB); the
    full integrity_check also matches every index against its table, ~3x
    slower once the events table is large (200,000 events: 145 ms against
    45 ms), so only the jobs table gets it (~6 ms): update() finds a job
    through its primary-key index, and an index that disagrees loses writes.
    """
    problems = [line for row in db.execute("PRAGMA quick_check") for line in str(row[0]).splitlines()]
    has_jobs = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone()
    if problems == ["ok"] and has_jobs:
        problems = [line for row in db.execute("PRAGMA integrity_check(jobs)") for line in str(row[0]).splitlines()]
    problems = [line for line in problems if line != "ok" and not line.startswith("***")]
    if problems:
        more = f", and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise _refusal(state_dir, path, f"is damaged (sqlite's integrity check: {problems[0][:120]}{more})",
                       _REMEDY_RESTORE)


def _check_schema(state_dir: Path, path: Path, db: sqlite3.Connection) -> bool:
    """Whether the file is ours and readable by this version; True when it must be adopted (new or unstamped)."""
    app = db.execute("PRAGMA application_id").fetchone()[0]
    version = db.execute("PRAGMA user_version").fetchone()[0]
    tables = {row[0]: frozenset(col["name"] for col in db.execute(_table_info(row[0])))
              for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                    "AND name NOT LIKE 'sqlite_%'")}
    not_ours = "point --state-dir at the scheduler's own directory, or move {name} out of {dir} to start with no jobs"
    if app not in (0, APPLICATION_ID):
        raise _refusal(state_dir, path, f"belongs to another application (sqlite application_id {app:#x})", not_ours)
    if app == APPLICATION_ID and version > SCHEMA_VERSION:
        raise _refusal(state_dir, path, f"was written by a newer pscluster (schema version {version}, this one "
                                        f"reads up to {SCHEMA_VERSION})",
                       "run that version, or restore a backup this version wrote")
    if app == 0:  # unstamped: empty (new), a store from before the stamp, or another program's file
        if not tables:
            return True
        missing = _missing(tables, legacy=True)
        if version != 0 or set(tables) - set(_TABLES) or missing:
            why = missing if missing and "jobs" in tables else "its tables: " + ", ".join(sorted(tables)[:6])
            raise _refusal(state_dir, path, f"is not a pscluster job store ({why})", not_ours)
        return True
    missing = _missing(tables, legacy=False)
    if missing or version != SCHEMA_VERSION:
        what = missing or f"schema version {version}"
        raise _refusal(state_dir, path, f"is a pscluster job store with a damaged schema ({what})", _REMEDY_RESTORE)
    return False


def _table_info(table: str) -> str:
    return 'PRAGMA table_info("' + table.replace('"', '""') + '")'  # a name from someone else's file


def _missing(tables: dict, *, legacy: bool) -> str:
    """What the store lacks ('' when nothing): tables, or columns of tables it has."""
    for table, columns in _TABLES.items():
        if table not in tables:
            if legacy and table != "jobs":
                continue  # created by _adopt
            return f"no {table} table"
        lacking = columns - tables[table] - (_LEGACY_OPTIONAL.get(table, frozenset()) if legacy else frozenset())
        if lacking:
            return f"table {table} lacks {', '.join(sorted(lacking))}"
    return ""


def _adopt(db: sqlite3.Connection) -> None:
    """Create the schema, or bring an unstamped one up to date, and stamp it, in one transaction."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.execute(_SCHEMA)
        db.execute(_META_SCHEMA)
        db.execute(_EVENTS_SCHEMA)
        db.execute(_EVENTS_INDEX)
        columns = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
        if "submission_id" not in columns:  # a store from before idempotent submits
            db.execute("ALTER TABLE jobs ADD COLUMN submission_id TEXT NOT NULL DEFAULT ''")
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _refusal(state_dir: Path, path: Path, problem: str, remedy: str) -> StoreError:
    return StoreError(f"state dir {state_dir}: {path.name} {problem}; "
                      + remedy.format(name=path.name, dir=state_dir))


def _access_error(state_dir: Path, path: Path, exc: sqlite3.Error) -> StoreError:
    return _refusal(state_dir, path, f"cannot be opened by sqlite ({exc})",
                    "check that this user can read and write {dir} and the files in it, and that no other "
                    "process holds them locked")
