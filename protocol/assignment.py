"""What the scheduler tells a worker to do: the body of an `assign` reply.

One typed object instead of a bare dict read by key, like `Plan`: the
scheduler builds it and sends `to_wire()`, the worker reads it back with
`from_wire()`, which checks every field and raises ValueError with one
sentence for anything off.

A training assignment names the data partitions the worker holds now
(`partitions`) out of the job's `num_partitions`, and the steps each
partition owes (`steps`, index = partition; empty until the first worker
of an `epochs:` job has measured the data). The worker reads where each
partition stands from the shards' clock tables, so a partition that
changes hands resumes at its next step, never skipping one.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

TRAIN, EVAL = "train", "eval"


@dataclass(frozen=True)
class Assignment:
    """One worker's part in one job."""

    task: str                           # TRAIN | EVAL
    job: str
    spec: dict
    shards: list[str]                   # plan shard k -> address
    partitions: list[int] = field(default_factory=list)   # held by this worker (TRAIN)
    num_partitions: int = 1
    steps: list[int] = field(default_factory=list)        # owed per partition; [] = not known yet
    init: bool = False                  # this worker builds the plan and creates the tables
    plan: dict | None = None            # the job's plan (wire form), once made
    nonlearned: list[str] = field(default_factory=list)
    epoch: int = 0                      # the membership epoch these partitions are held in
    max_model_bytes: int = 0            # the scheduler's limit on parameter bytes (0: none)
    shard_keys: list[str] = field(default_factory=list)   # CURVE public key per shard ("": CURVE off)
    max_message_bytes: int = 0          # the least --max-message-bytes of the job's shards (0: not known)

    def to_wire(self) -> dict:
        return {"task": self.task, "job": self.job, "spec": self.spec, "shards": list(self.shards),
                "partitions": list(self.partitions), "num_partitions": self.num_partitions,
                "steps": list(self.steps), "init": self.init, "plan": self.plan,
                "nonlearned": list(self.nonlearned), "epoch": self.epoch,
                "max_model_bytes": self.max_model_bytes, "shard_keys": list(self.shard_keys),
                "max_message_bytes": self.max_message_bytes}

    @classmethod
    def from_wire(cls, body: object) -> Assignment:
        """The assignment in a reply body; ValueError naming the first bad field."""
        if not isinstance(body, Mapping):
            raise ValueError(f"an assignment must be a map, found {type(body).__name__}")
        task = body.get("task")
        if task not in (TRAIN, EVAL):
            raise ValueError(f"assignment task must be {TRAIN} or {EVAL}, found {task!r:.40}")
        _want(body, "job", str)
        _want(body, "spec", dict)
        shards = _want(body, "shards", list)
        if not shards or not all(isinstance(a, str) and a for a in shards):
            raise ValueError("assignment shards must be a non-empty list of addresses")
        num = _want(body, "num_partitions", int)
        if num < 1:
            raise ValueError(f"assignment num_partitions must be >= 1, found {num}")
        parts = _want(body, "partitions", list)
        if not all(_is_int(p) and 0 <= p < num for p in parts) or len(set(parts)) != len(parts):
            raise ValueError(f"assignment partitions must be distinct indices in 0..{num - 1}")
        steps = _want(body, "steps", list)
        if steps and (len(steps) != num or not all(_is_int(s) and s >= 1 for s in steps)):
            raise ValueError(f"assignment steps must list {num} step counts >= 1")
        plan = body.get("plan")
        if plan is not None and not isinstance(plan, dict):
            raise ValueError("assignment plan must be a map or null")
        nonlearned = _want(body, "nonlearned", list)
        if not all(isinstance(n, str) for n in nonlearned):
            raise ValueError("assignment nonlearned must list tensor names")
        keys = body.get("shard_keys", [])
        if not isinstance(keys, list) or (keys and (len(keys) != len(shards) or
                                                    not all(isinstance(k, str) and len(k) in (0, 40) for k in keys))):
            raise ValueError("assignment shard_keys must give one CURVE public key (or \"\") per shard")
        limit = body.get("max_message_bytes", 0)
        if not _is_int(limit) or limit < 0:
            raise ValueError(f"assignment max_message_bytes must be an int >= 0, found {limit!r:.40}")
        return cls(task=task, job=body["job"], spec=body["spec"], shards=list(shards), partitions=list(parts),
                   num_partitions=num, steps=list(steps), init=_want(body, "init", bool), plan=plan,
                   nonlearned=list(nonlearned), epoch=_want(body, "epoch", int),
                   max_model_bytes=_want(body, "max_model_bytes", int), shard_keys=list(keys),
                   max_message_bytes=limit)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _want(body: Mapping, key: str, kind: type):
    value = body.get(key)
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise ValueError(f"assignment field {key!r} must be {kind.__name__}, found {type(value).__name__}")
    return value
