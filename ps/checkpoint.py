"""Shard checkpoints: parameters, optimizer state and clock table of one job.

A checkpoint is one `.npz` file written to a temporary name, fsync'd, then
renamed over its final name and the directory fsync'd (README.md,
"Durability"): a crash leaves either the old checkpoint or the new one,
never half of one. Only files named `ckpt-<version>.npz` count as complete;
a temporary file is never one of them. No pickles: metadata is JSON stored
as a byte array, written last, and it records every other array's name,
shape, dtype and CRC-32.

Nothing is trusted on the way back in. `load` checks, in this order, and
raises `BadCheckpoint` with a short reason naming the field at the first
that fails: the file is a readable npz without pickles; its meta parses;
every array's checksum, shape and dtype match its record; then the meta
against what is expected (job id, shard id, a version >= 0 that matches
the file's name, the plan and this shard's slices in it, the policy state),
every value finite, and the optimizer state complete for its kind.
`load_newest_valid` tries a job's checkpoints newest first and logs one
line per file it skips, so a damaged newest file costs the versions since
the one before it, not the job.

Writing happens off the shard's loop (ps/checkpoint_writer.py); this module
is plain file work and may run on any thread.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocol.errors import ProtocolError
from protocol.plan import Plan
from ps.optim import make_optimizer
from ps.policy import Policy
from ps.table import JobTable

log = logging.getLogger("pscluster.server")

# Keep this many complete checkpoints per job and shard; older ones are
# deleted once a newer one is complete (but for those the caller protects).
# Three, so that while the newest is being replaced (a write in progress) and
# one of the others turns out damaged, an intact one is still there to fall
# back on.
KEEP_CHECKPOINTS = 3
# The meta's layout; a file of another format is refused, not guessed at.
FORMAT = 2
# Bytes per chunk when writing and checksumming an array: big enough that
# the per-chunk Python work is noise, small enough that the chunk is still
# in cache when zipfile checksums it again and the file write reads it.
CHUNK_BYTES = 4 << 20
# Elements per chunk of the finiteness check: bounds its boolean temporary.
FINITE_CHUNK_ELEMS = 1 << 22
_NAME_RE = re.compile(r"^ckpt-(\d{12})\.npz$")
_TMP_PREFIX = ".tmp-"
_VALUE_RE = re.compile(r"^value\.(\d+)$")
_STATE_RE = re.compile(r"^state\.(\d+)\.([A-Za-z0-9_]+)$")
MAX_CHECKPOINT_EVERY = 10**9


class BadCheckpoint(ValueError):
    """A checkpoint file that must not be loaded; `reason` names the field that failed."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --- names -----------------------------------------------------------------------------------

def job_dir(root: str | os.PathLike, job: str, shard_id: int) -> Path:
    return Path(root) / f"shard-{shard_id}" / job


def path_of(directory: Path, version: int) -> Path:
    return Path(directory) / f"ckpt-{version:012d}.npz"


def versions(directory: str | os.PathLike) -> list[int]:
    """Versions of the complete checkpoint files in `directory`, ascending (none: [])."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = (_NAME_RE.match(p.name) for p in directory.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint file in `directory` (unchecked), or None."""
    have = versions(directory)
    return path_of(directory, have[-1]) if have else None


def jobs_on_disk(root: str | os.PathLike, shard_id: int) -> list[str]:
    """Job ids with at least one complete checkpoint file for this shard."""
    base = Path(root) / f"shard-{shard_id}"
    if not base.is_dir():
        return []
    return sorted(d.name for d in base.iterdir() if d.is_dir() and versions(d))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- writing ---------------------------------------------------------------------------------

@dataclass
class Snapshot:
    """What one checkpoint holds: the meta (without the array records) and the arrays.

    The writer only reads the arrays; whoever made the snapshot makes sure
    nothing changes them until the write is done (ps/checkpoint_writer.py).
    """

    job: str
    shard_id: int
    version: int
    meta: dict
    values: dict[int, np.ndarray]
    state: dict[int, dict[str, np.ndarray]]


@dataclass
class Written:
    """One finished write: where, which older versions it deleted, and what it took (seconds)."""

    path: Path
    version: int
    deleted: list[int] = field(default_factory=list)
    seconds: float = 0.0
    checksum_s: float = 0.0
    nbytes: int = 0


def meta_of(table) -> dict:
    """The meta of a checkpoint of `table` (a JobTable), as of now."""
    return {
        "format": FORMAT,
        "job": table.job,
        "shard_id": table.shard_id,
        "version": table.version,
        "plan": table.plan.to_wire(),
        "optimizer": table.optimizer.spec,
        "policy": table.policy.state(),
        "nonlearned": table.nonlearned_names,
        "checkpoint_every": table.checkpoint_every,
    }


def snapshot_of(table, *, copy: bool = True) -> Snapshot:
    """`table` as of now; with `copy`, every array copied (the caller may keep updating the table)."""
    take = (lambda a: np.array(a, copy=True)) if copy else (lambda a: a)
    return Snapshot(table.job, table.shard_id, table.version, meta_of(table),
                    {sid: take(v) for sid, v in table.values.items()},
                    {sid: {k: take(a) for k, a in st.items()} for sid, st in table.opt_state.items()})


def _contiguous(arr: np.ndarray) -> np.ndarray:
    """`arr` in C order, 0-d kept 0-d (np.ascontiguousarray makes it 1-d)."""
    arr = np.asarray(arr)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _write_member(zf: zipfile.ZipFile, name: str, arr: np.ndarray) -> tuple[int, float]:
    """One array as `name`.npy, streamed from its own memory (no copy); (its data's CRC-32, seconds in it)."""
    arr = _contiguous(arr)
    spent = 0.0
    crc = 0
    with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
        np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(arr))
        data = memoryview(arr.reshape(-1)).cast("B")
        for lo in range(0, len(data), CHUNK_BYTES):
            chunk = data[lo:lo + CHUNK_BYTES]
            t0 = time.perf_counter()
            crc = zlib.crc32(chunk, crc)
            spent += time.perf_counter() - t0
            out.write(chunk)
    return crc, spent


def write_file(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> tuple[int, float]:
    """Write `arrays` and then `meta` (with their records added) to `path` as an npz; fsync'd.

    Not atomic by itself (`write` renames). The checksum is zlib's CRC-32
    of each array's bytes: it is there to catch damage (a torn or rotted
    file, a bit flipped on the way), not tampering, and it runs at about
    2 GB/s where blake2b manages 0.26 GB/s and the disk 0.3-0.4 GB/s
    (measured here on 200 MB): a cryptographic hash would be the slowest
    part of the write. Returns (bytes of array data, seconds spent checksumming).
    """
    records = {}
    spent = 0.0
    nbytes = 0
    with open(path, "wb") as fh:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in arrays.items():
                crc, dt = _write_member(zf, name, arr)
                spent += dt
                nbytes += arr.nbytes
                records[name] = {"shape": list(arr.shape), "dtype": arr.dtype.name, "crc32": crc}
            body = json.dumps({**meta, "arrays": records}).encode()
            _write_member(zf, "meta", np.frombuffer(body, dtype=np.uint8))
        fh.flush()
        os.fsync(fh.fileno())
    return nbytes, spent


def _arrays_of(snap: Snapshot) -> dict[str, np.ndarray]:
    arrays = {f"value.{sid}": v for sid, v in snap.values.items()}
    for sid, state in snap.state.items():
        for key, arr in state.items():
            arrays[f"state.{sid}.{key}"] = np.asarray(arr)
    return arrays


def write(root: str | os.PathLike, snap: Snapshot, *, protect=()) -> Written:
    """Write `snap` atomically, then delete what it makes obsolete; what was done.

    Obsolete: every file of a version newer than this one (a history the
    job was rolled back from: loading it later would undo the rollback),
    and all but the newest KEEP_CHECKPOINTS, except the versions in `protect`.
    """
    t0 = time.perf_counter()
    directory = job_dir(root, snap.job, snap.shard_id)
    directory.mkdir(parents=True, exist_ok=True)
    final = path_of(directory, snap.version)
    tmp = directory / f"{_TMP_PREFIX}{os.getpid()}-{final.name}"
    try:
        nbytes, checksum_s = write_file(tmp, snap.meta, _arrays_of(snap))
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    deleted = prune_newer(directory, snap.version)
    keep = set(protect)
    for old in versions(directory)[:-KEEP_CHECKPOINTS]:
        if old not in keep:
            path_of(directory, old).unlink(missing_ok=True)
            deleted.append(old)
    return Written(final, snap.version, sorted(deleted), time.perf_counter() - t0, checksum_s, nbytes)


def save(root: str | os.PathLike, table) -> Path:
    """Write `table` (a JobTable nothing updates meanwhile) atomically; returns the checkpoint's path."""
    return write(root, snapshot_of(table, copy=False)).path


def prune_newer(directory: Path, version: int) -> list[int]:
    """Delete the complete checkpoints newer than `version`; the versions deleted."""
    newer = [v for v in versions(directory) if v > version]
    for v in newer:
        path_of(directory, v).unlink(missing_ok=True)
    if newer:
        _fsync_dir(directory)
    return newer


def remove_temporaries(directory: Path) -> int:
    """Delete the temporary files of writes that never finished (a killed process's); how many."""
    if not Path(directory).is_dir():
        return 0
    stale = [p for p in Path(directory).iterdir() if p.name.startswith(_TMP_PREFIX)]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def remove(root: str | os.PathLike, job: str, shard_id: int) -> None:
    """Delete every checkpoint of `job` on this shard (after `drop`)."""
    directory = job_dir(root, job, shard_id)
    if directory.is_dir():
        for p in directory.iterdir():
            p.unlink(missing_ok=True)
        directory.rmdir()


# --- reading ---------------------------------------------------------------------------------

def read(path: Path) -> tuple[dict, dict[int, np.ndarray], dict[int, dict[str, np.ndarray]]]:
    """(meta, values by sid, optimizer state by sid) of one checkpoint file, unchecked (tools, tests)."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        values: dict[int, np.ndarray] = {}
        state: dict[int, dict[str, np.ndarray]] = {}
        for key in data.files:
            if key.startswith("value."):
                values[int(key.split(".")[1])] = data[key]
            elif key.startswith("state."):
                _, sid, name = key.split(".", 2)
                state.setdefault(int(sid), {})[name] = data[key]
    return meta, values, state


@dataclass
class Loaded:
    """A checkpoint that passed every check: its meta, plan and arrays (empty when not kept)."""

    path: Path
    version: int
    meta: dict
    plan: Plan
    values: dict[int, np.ndarray]
    state: dict[int, dict[str, np.ndarray]]


def _is_int(value) -> bool:
    return type(value) is int


def _finite(arr: np.ndarray) -> bool:
    if arr.dtype.kind not in "fc":
        return True
    flat = arr.reshape(-1)
    return all(bool(np.isfinite(flat[lo:lo + FINITE_CHUNK_ELEMS]).all())
               for lo in range(0, flat.size, FINITE_CHUNK_ELEMS))


def _read_meta(data) -> dict:
    try:
        raw = data["meta"]
    except Exception as exc:  # zipfile, numpy and OS errors alike: the file is what is wrong
        raise BadCheckpoint(f"unreadable: meta: {type(exc).__name__}: {exc}") from None
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise BadCheckpoint(f"meta: a {raw.dtype} array of shape {raw.shape}, expected bytes of JSON")
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadCheckpoint(f"meta: not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise BadCheckpoint(f"meta: a JSON {type(meta).__name__}, expected an object")
    return meta


def _check_arrays(data, meta: dict, keep: bool) -> tuple[dict[str, np.ndarray], dict[str, dict], set[str]]:
    """Every array against its record (checksum, shape, dtype); (arrays if kept, records, names not finite)."""
    records = meta.get("arrays")
    if not isinstance(records, dict):
        raise BadCheckpoint("meta.arrays: missing (a checkpoint without checksums)")
    names = set(data.files) - {"meta"}
    for name in sorted(set(records) ^ names):
        where = "is recorded in meta but missing" if name in records else "is in the file but not recorded in meta"
        raise BadCheckpoint(f"array {name}: {where}")
    kept: dict[str, np.ndarray] = {}
    not_finite: set[str] = set()
    for name in sorted(names):
        rec = records[name]
        if not (isinstance(rec, dict) and _is_int(rec.get("crc32")) and isinstance(rec.get("shape"), list)
                and isinstance(rec.get("dtype"), str)):
            raise BadCheckpoint(f"meta.arrays.{name}: expected shape, dtype and crc32")
        try:
            arr = data[name]
        except zipfile.BadZipFile as exc:
            if "CRC" in str(exc):  # zipfile checks its own CRC-32 of the member as it reads it
                raise BadCheckpoint(f"array {name}: checksum does not match (damaged: {exc})") from None
            raise BadCheckpoint(f"unreadable: {name}: BadZipFile: {exc}") from None
        except Exception as exc:  # a short read, a pickle, a bad header
            raise BadCheckpoint(f"unreadable: {name}: {type(exc).__name__}: {exc}") from None
        if list(arr.shape) != rec["shape"] or arr.dtype.name != rec["dtype"]:
            raise BadCheckpoint(f"array {name}: {arr.dtype.name}{list(arr.shape)} in the file, "
                                f"{rec['dtype']}{rec['shape']} recorded")
        if zlib.crc32(memoryview(_contiguous(arr).reshape(-1)).cast("B")) != rec["crc32"]:
            raise BadCheckpoint(f"array {name}: checksum does not match its record (damaged)")
        if not _finite(arr):
            not_finite.add(name)
        if keep:
            kept[name] = arr
    return kept, records, not_finite


def _check_meta(meta: dict, path: Path, *, job: str, shard_id: int, plan: Plan | None) -> tuple[Plan, Policy]:
    if meta.get("format") != FORMAT:
        raise BadCheckpoint(f"meta.format: {meta.get('format')!r:.20}, expected {FORMAT}")
    if meta.get("job") != job:
        raise BadCheckpoint(f"meta.job: {meta.get('job')!r:.80}, expected {job!r} (another job's checkpoint)")
    if not _is_int(meta.get("shard_id")) or meta["shard_id"] != shard_id:
        raise BadCheckpoint(f"meta.shard_id: {meta.get('shard_id')!r:.20}, expected {shard_id} "
                            "(another shard's checkpoint)")
    version = meta.get("version")
    if not _is_int(version) or version < 0:
        raise BadCheckpoint(f"meta.version: {version!r:.20}, expected an integer >= 0")
    named = _NAME_RE.match(path.name)
    if named and int(named.group(1)) != version:
        raise BadCheckpoint(f"meta.version: {version}, but the file is named for version {int(named.group(1))}")
    try:
        own = Plan.from_wire(meta.get("plan"))
    except ProtocolError as exc:
        raise BadCheckpoint(f"meta.plan: {exc.message}") from None
    if plan is not None and own.digest != plan.digest:
        raise BadCheckpoint(f"meta.plan: digest {own.digest}, the job's plan is {plan.digest}")
    if not shard_id < own.num_shards:
        raise BadCheckpoint(f"meta.plan: has {own.num_shards} shards, this is shard {shard_id}")
    try:
        policy = Policy.from_state(meta.get("policy") if isinstance(meta.get("policy"), dict) else {})
    except ValueError as exc:
        raise BadCheckpoint(f"meta.policy: {exc}") from None
    if policy.version != version:
        raise BadCheckpoint(f"meta.policy.version: {policy.version}, meta.version is {version}")
    nonlearned = meta.get("nonlearned")
    if not isinstance(nonlearned, list) or not set(nonlearned) <= set(own.names):
        raise BadCheckpoint("meta.nonlearned: expected a list of the plan's tensor names")
    every = meta.get("checkpoint_every")
    if not _is_int(every) or not 0 <= every <= MAX_CHECKPOINT_EVERY:
        raise BadCheckpoint(f"meta.checkpoint_every: {every!r:.20}, expected 0..{MAX_CHECKPOINT_EVERY}")
    return own, policy


def _check_slices(records: dict, own: Plan, shard_id: int, not_finite: set[str], meta: dict) -> None:
    """This shard's slices (sizes, dtypes), finiteness, then the optimizer state its kind keeps."""
    held = {s.sid: s for s in own.slices_on(shard_id)}
    values = {int(m.group(1)): name for name in records if (m := _VALUE_RE.match(name))}
    for sid, spec in held.items():
        rec = records.get(f"value.{sid}")
        if rec is None:
            raise BadCheckpoint(f"value.{sid}: missing (slice {sid} of tensor {spec.name!r} is on this shard)")
        if rec["dtype"] != spec.dtype or rec["shape"] != [spec.count]:
            raise BadCheckpoint(f"value.{sid}: {rec['dtype']}{rec['shape']}, the plan's slice is "
                                f"{spec.dtype}[{spec.count}]")
    extra = sorted(set(values) - set(held))
    if extra:
        raise BadCheckpoint(f"value.{extra[0]}: not a slice of shard {shard_id} in the plan")
    if not_finite:
        raise BadCheckpoint(f"array {min(not_finite)}: holds values that are not finite (NaN or infinity)")
    try:
        optimizer = make_optimizer(meta.get("optimizer"))
    except ValueError as exc:
        raise BadCheckpoint(f"meta.optimizer: {exc}") from None
    keeps = optimizer.init_state(np.zeros(1, np.float32))
    nonlearned = set(meta["nonlearned"])
    learned = {sid for sid, s in held.items() if s.name not in nonlearned}
    state: dict[int, set[str]] = {}
    for name in records:
        m = _STATE_RE.match(name)
        if m:
            state.setdefault(int(m.group(1)), set()).add(m.group(2))
        elif name not in values.values():
            raise BadCheckpoint(f"array {name}: not a value or optimizer state of a slice")
    stray = sorted(set(state) - learned)
    if stray:
        raise BadCheckpoint(f"state.{stray[0]}: optimizer state for a slice this shard does not learn")
    for sid in sorted(learned):
        have = state.get(sid, set())
        if have != set(keeps):
            missing = sorted(set(keeps) - have)
            what = f"lacks {missing[0]!r}" if missing else f"has {sorted(have - set(keeps))[0]!r}"
            raise BadCheckpoint(f"state.{sid}: optimizer state {what} ({optimizer.kind} keeps "
                                f"{', '.join(sorted(keeps)) or 'nothing'})")
        for key, fresh in keeps.items():
            rec = records[f"state.{sid}.{key}"]
            want = [held[sid].count] if fresh.ndim else []
            if rec["dtype"] != fresh.dtype.name or rec["shape"] != want:
                raise BadCheckpoint(f"state.{sid}.{key}: {rec['dtype']}{rec['shape']}, expected "
                                    f"{fresh.dtype.name}{want}")


def load(path: str | os.PathLike, *, job: str, shard_id: int, plan: Plan | None = None,
         keep: bool = True) -> Loaded:
    """Check one checkpoint file (the order is in this module's docstring) and return it.

    `plan`: the job's plan, when the caller knows it (a `restore`); without
    it the file's own plan is checked for consistency only. With `keep`
    false the arrays are checked one at a time and not returned, so a file
    is verified in the memory of its largest slice. BadCheckpoint names
    the first failure.
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # missing, truncated, not a zip, not an npz: all the same to the caller
        raise BadCheckpoint(f"unreadable: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise BadCheckpoint("unreadable: a single array, not an npz")
    with data:
        if "meta" not in data.files:
            raise BadCheckpoint("meta: missing")
        meta = _read_meta(data)
        kept, records, not_finite = _check_arrays(data, meta, keep)
    own, _policy = _check_meta(meta, path, job=job, shard_id=shard_id, plan=plan)
    _check_slices(records, own, shard_id, not_finite, meta)
    values = {int(m.group(1)): arr.reshape(-1) for name, arr in kept.items() if (m := _VALUE_RE.match(name))}
    state: dict[int, dict[str, np.ndarray]] = {}
    for name, arr in kept.items():
        if m := _STATE_RE.match(name):
            state.setdefault(int(m.group(1)), {})[m.group(2)] = arr
    return Loaded(path, meta["version"], meta, own, values, state)


def validate(path: str | os.PathLike, *, job: str, shard_id: int, plan: Plan | None = None) -> int:
    """Every check `load` makes, keeping no arrays; the checkpoint's version (BadCheckpoint if bad)."""
    return load(path, job=job, shard_id=shard_id, plan=plan, keep=False).version


def load_newest_valid(directory: str | os.PathLike, *, job: str, shard_id: int,
                      plan: Plan | None = None) -> Loaded | None:
    """The newest checkpoint in `directory` that passes every check, or None.

    Each file passed over is logged ("checkpoint skipped", with its path
    and the reason), newest first.
    """
    for version in reversed(versions(directory)):
        path = path_of(Path(directory), version)
        try:
            return load(path, job=job, shard_id=shard_id, plan=plan)
        except BadCheckpoint as exc:
            log.warning("checkpoint skipped", extra={"job": job, "shard": shard_id, "path": str(path),
                                                     "why": exc.reason})
    return None


def build_table(loaded: Loaded, shard_id: int) -> JobTable:
    """A JobTable holding a loaded checkpoint: values, optimizer state, policy (clocks, version)."""
    meta = loaded.meta
    table = JobTable(meta["job"], loaded.plan, shard_id, make_optimizer(meta["optimizer"]),
                     Policy.from_state(meta["policy"]), nonlearned=meta["nonlearned"],
                     initial=loaded.values, checkpoint_every=meta["checkpoint_every"])
    table.load_state(loaded.state)
    return table
