"""Checks of what peers send the scheduler, before any of it is used.

`decode` has checked the types of the header fields; these check the
free-form maps inside them (`info`, heartbeat and report `state`) and the
addresses servers give. Each returns a clean copy with known keys, right
types and bounded sizes, or raises ProtocolError(BAD_FIELD) with one
sentence. Nothing a peer sends reaches a socket call, a file or a view
unchecked.
"""
from __future__ import annotations

import math
import re
from typing import Any

from protocol.errors import ErrorCode, ProtocolError
from protocol.jobspec import MAX_STEPS, MAX_WORKERS
from protocol.partitions import partition_index
from protocol.plan import MAX_DIMS, MAX_NAME_CHARS, MAX_TENSORS

# Free-form facts a daemon registers with (host, pid, device): kept short.
MAX_INFO_KEYS = 16
MAX_INFO_CHARS = 128
# Jobs a server heartbeat may describe, and workers per job's clock table.
MAX_SHARD_JOBS = 10_000
MAX_CLOCKS = 4096
MAX_ERROR_CHARS = 500

_TCP = re.compile(r"tcp://([A-Za-z0-9_.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):([0-9]{1,5})")
_IPC = re.compile(r"ipc://[^\x00-\x20]{1,193}")


def bad(message: str, rid: int) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_FIELD, message, rid=rid)


def server_address(addr: str, rid: int) -> str:
    """A server's address the scheduler and workers can connect to: tcp://HOST:PORT or ipc://PATH."""
    m = _TCP.fullmatch(addr)
    if m and 1 <= int(m.group(2)) <= 65535:
        return addr
    if _IPC.fullmatch(addr):
        return addr
    raise bad(f"a server registers with an address like tcp://HOST:PORT (port 1-65535) or ipc://PATH, "
              f"found {addr!r:.80}", rid)


def info(raw: dict) -> dict[str, str]:
    """A peer's self-description, stringified and cut to size (never refused: it is only shown)."""
    out = {}
    for key, value in list(raw.items())[:MAX_INFO_KEYS]:
        out[str(key)[:64]] = str(value)[:MAX_INFO_CHARS]
    return out


def _int(value: Any, lo: int, hi: int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
        return value
    return None


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def shard_stats(state: dict) -> dict[str, dict]:
    """The per-job table summaries of a server heartbeat, reduced to what status views show.

    Anything malformed is dropped (the heartbeat still counts for liveness).
    """
    jobs = state.get("jobs")
    if not isinstance(jobs, dict):
        return {}
    out: dict[str, dict] = {}
    for job, summary in list(jobs.items())[:MAX_SHARD_JOBS]:
        if not isinstance(job, str) or not isinstance(summary, dict):
            continue
        clean: dict[str, Any] = {}
        for key in ("version", "epoch", "parked", "pushes", "pulls", "min_clock", "max_clock", "staleness_bound"):
            clean[key] = _int(summary.get(key), -1, 2**62)
        clean["policy"] = str(summary.get("policy", ""))[:8]
        clocks = summary.get("clocks")
        clean["clocks"] = ({str(w)[:MAX_NAME_CHARS]: c for w, c in list(clocks.items())[:MAX_CLOCKS]
                            if _int(c, 0, 2**62) is not None} if isinstance(clocks, dict) else {})
        hist = summary.get("staleness_hist")
        clean["staleness_hist"] = ({str(k)[:12]: v for k, v in list(hist.items())[:256]
                                    if str(k).isdigit() and _int(v, 0, 2**62) is not None}
                                   if isinstance(hist, dict) else {})
        out[job[:MAX_NAME_CHARS]] = clean
    return out


def part_states(raw: Any, rid: int) -> dict[int, dict]:
    """A worker's per-partition progress: {"3": {"from", "step", "loss", "accuracy", "max_staleness"}}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_WORKERS:
        raise bad(f"state.parts must map at most {MAX_WORKERS} partition indices to their progress", rid)
    out: dict[int, dict] = {}
    for key, item in raw.items():
        digits = isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 6
        index = _int(int(key), 0, MAX_WORKERS - 1) if digits else None
        if index is None or not isinstance(item, dict):
            raise bad(f"state.parts: {key!r:.20} is not a partition index with a map of its progress", rid)
        clean: dict[str, Any] = {}
        for name in ("from", "step"):
            if name in item:
                clean[name] = _int(item[name], 0, MAX_STEPS)
                if clean[name] is None:
                    raise bad(f"state.parts.{key}.{name} must be a step count in 0..{MAX_STEPS}", rid)
        for name in ("loss", "accuracy"):
            clean[name] = _finite(item.get(name))
        clean["max_staleness"] = _int(item.get("max_staleness"), 0, 2**40)
        out[index] = clean
    return out


def indices(raw: Any, count: int, rid: int, what: str) -> list[int]:
    """A list of distinct partition indices below `count`."""
    if not isinstance(raw, list) or len(raw) > count or len(set(map(repr, raw))) != len(raw) \
            or not all(_int(k, 0, count - 1) is not None for k in raw):
        raise bad(f"{what} must list distinct partition indices in 0..{count - 1}", rid)
    return list(raw)


def error_text(raw: Any, default: str) -> str:
    """A worker's error sentence, cut to size."""
    return str(raw)[:MAX_ERROR_CHARS] if raw else default


def tensors(raw: Any, rid: int) -> list[tuple[str, tuple[int, ...], str]]:
    """The model's tensors as [name, shape, dtype] lists."""
    from protocol.version import ALLOWED_DTYPES

    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_TENSORS:
        raise bad(f"state.tensors must list 1..{MAX_TENSORS} [name, shape, dtype] entries", rid)
    out = []
    for item in raw:
        ok = (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
              and 0 < len(item[0]) <= MAX_NAME_CHARS and isinstance(item[1], list) and len(item[1]) <= MAX_DIMS
              and all(_int(d, 0, 2**40) is not None for d in item[1]) and item[2] in ALLOWED_DTYPES)
        if not ok:
            raise bad(f"state.tensors: {item!r:.80} is not a [name, shape, dtype] entry", rid)
        out.append((item[0], tuple(item[1]), item[2]))
    if len({name for name, _s, _d in out}) != len(out):
        raise bad("state.tensors names a tensor twice", rid)
    return out


# Checkpoint versions a shard may list per job (it keeps a few: ps/checkpoint.py).
MAX_CHECKPOINT_VERSIONS = 16


def _job_versions(raw: Any, many: bool) -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {}
    out: dict[str, Any] = {}
    for job, value in list(raw.items())[:MAX_SHARD_JOBS]:
        if not isinstance(job, str):
            continue
        if many:
            versions = value if isinstance(value, list) else []
            kept = sorted({v for v in versions[:MAX_CHECKPOINT_VERSIONS] if _int(v, 0, 2**62) is not None})
            out[job] = kept
        elif _int(value, 0, 2**62) is not None:
            out[job] = value
    return out


def shard_checkpoints(state: dict) -> dict[str, list[int]]:
    """job -> the complete, valid checkpoint versions a server heartbeat lists (malformed: dropped)."""
    return _job_versions(state.get("checkpoints"), many=True)


def restored_jobs(raw_info: Any) -> dict[str, int]:
    """job -> the checkpoint version a (re)started server restored, from its registration info."""
    return _job_versions(raw_info.get("restored") if isinstance(raw_info, dict) else None, many=False)


def part_clocks(raw: Any, count: int) -> dict[int, int]:
    """partition index -> step, from a shard's clock table {"p0": 12, ...} (other members and
    malformed entries dropped)."""
    if not isinstance(raw, dict):
        return {}
    out: dict[int, int] = {}
    for key, value in list(raw.items())[:MAX_CLOCKS]:
        index = partition_index(key) if isinstance(key, str) else None
        if index is not None and index < count and _int(value, 0, 2**62) is not None:
            out[index] = value
    return out


def init_source(spec: dict, jobs: dict, rid: int) -> None:
    """`init_from: job:ID` names a job of this scheduler whose parameters exist (BAD_SPEC otherwise)."""
    source = spec.get("init_from") or ""
    if not source.startswith("job:"):
        return
    record = jobs.get(source[len("job:"):])
    if record is None:
        raise ProtocolError(ErrorCode.BAD_SPEC, f"init_from: no job {source[4:]!r} on this scheduler", rid=rid)
    if not record.plan:
        raise ProtocolError(ErrorCode.BAD_SPEC, f"init_from: job {record.id} never created its parameters "
                            f"(it is {record.state})", rid=rid)
