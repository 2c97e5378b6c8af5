"""Shard checkpoints: parameters, optimizer state and clock table of one job.

A checkpoint is one `.npz` file written to a temporary name, fsync'd, then
renamed over its final name and the directory fsync'd (README.md,
"Durability"): a crash leaves either the old checkpoint or the
new one, never half of one. Only files named `ckpt-<version>.npz` are
loaded; a temporary file is never one of them. No pickles: metadata is
JSON stored as a byte array.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

# Keep this many checkpoints per job and shard; older ones are deleted
# once a newer one is complete.
KEEP_CHECKPOINTS = 2
_NAME_RE = re.compile(r"^ckpt-(\d{12})\.npz$")


def job_dir(root: str | os.PathLike, job: str, shard_id: int) -> Path:
    return Path(root) / f"shard-{shard_id}" / job


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: str | os.PathLike, table) -> Path:
    """Write `table` (a JobTable) atomically; returns the checkpoint's path."""
    directory = job_dir(root, table.job, table.shard_id)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "job": table.job,
        "shard_id": table.shard_id,
        "version": table.version,
        "plan": table.plan.to_wire(),
        "optimizer": table.optimizer.spec,
        "policy": table.policy.state(),
        "nonlearned": table.nonlearned_names,
        "checkpoint_every": table.checkpoint_every,
    }
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for sid, value in table.values.items():
        arrays[f"value.{sid}"] = value
    for sid, state in table.opt_state.items():
        for key, arr in state.items():
            arrays[f"state.{sid}.{key}"] = np.asarray(arr)
    final = directory / f"ckpt-{table.version:012d}.npz"
    tmp = directory / f".tmp-{os.getpid()}-{final.name}"
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in sorted(p for p in directory.iterdir() if _NAME_RE.match(p.name))[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return final


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint file in `directory`, or None."""
    if not directory.is_dir():
        return None
    names = sorted(p for p in directory.iterdir() if _NAME_RE.match(p.name))
    return names[-1] if names else None


def read(path: Path) -> tuple[dict, dict[int, np.ndarray], dict[int, dict[str, np.ndarray]]]:
    """(meta, values by sid, optimizer state by sid) of one checkpoint file."""
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


def jobs_on_disk(root: str | os.PathLike, shard_id: int) -> list[str]:
    """Job ids with at least one complete checkpoint for this shard."""
    base = Path(root) / f"shard-{shard_id}"
    if not base.is_dir():
        return []
    return sorted(d.name for d in base.iterdir() if d.is_dir() and latest(d) is not None)


def remove(root: str | os.PathLike, job: str, shard_id: int) -> None:
    """Delete every checkpoint of `job` on this shard (after `drop`)."""
    directory = job_dir(root, job, shard_id)
    if directory.is_dir():
        for p in directory.iterdir():
            p.unlink(missing_ok=True)
        directory.rmdir()
