"""How a job is cut into data partitions and how many steps each one owes. Pure.

A job is `workers` data partitions times its steps. Partition k of N holds
the examples k, k + N, k + 2N, ... of the training set (strided, so sizes
differ by at most one), and owes either the job's `steps` or, for
`epochs: E`, E passes over its own examples: E x ceil(size / batch_size)
steps of full batches (worker/data/batches.py tops the last batch of an
epoch up). `psctl train-local` is the same job as one partition of the
whole set, so both count steps with the one function here.

Partitions, not workers, are the members of a job's clock table on the
shards: they are named "p0", "p1", ... there (`partition_key`), and a
worker pushes for the partitions it holds.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

PARTITION_PREFIX = "p"


def partition_key(index: int) -> str:
    """The clock-table member name of partition `index`: "p3"."""
    return f"{PARTITION_PREFIX}{index}"


def partition_index(key: str) -> int | None:
    """The partition index of a member name ("p3" -> 3), None for any other name."""
    if not key.startswith(PARTITION_PREFIX):
        return None
    digits = key[len(PARTITION_PREFIX):]
    if not (digits.isascii() and digits.isdigit()) or (len(digits) > 1 and digits[0] == "0"):
        return None
    return int(digits)


def partition_size(n: int, k: int, num: int) -> int:
    """Examples in partition k of num over a training set of n (the strided cut)."""
    if num < 1 or not 0 <= k < num or n < 0:
        raise ValueError(f"partition {k} of {num} over {n} examples does not exist")
    return max(0, (n - k + num - 1) // num)


def epoch_steps(examples: int, batch_size: int, epochs: float) -> int:
    """Steps of `epochs` passes over `examples`, each pass ceil(examples / batch_size) full batches."""
    per_epoch = max(1, math.ceil(examples / batch_size))
    return max(1, math.ceil(epochs * per_epoch - 1e-9))


def steps_owed(spec: Mapping, train_size: int, num: int | None = None) -> list[int]:
    """The steps each of the job's partitions owes, given the training set's size.

    `num` defaults to the job's `workers`; train-local passes 1.
    """
    num = int(spec["workers"]) if num is None else num
    if spec.get("steps"):
        return [int(spec["steps"])] * num
    batch = int(spec["data"]["batch_size"])
    return [epoch_steps(partition_size(train_size, k, num), batch, float(spec["epochs"])) for k in range(num)]


def schedule_length(spec: Mapping, owed: list[int]) -> dict:
    """The optimizer spec with a cosine schedule's length filled in from the steps owed.

    A cosine schedule with total_steps 0 decays over the job's steps: the
    most any partition owes (the learning rate counts the pushing
    partition's step). Returns a new dict; other kinds are unchanged.
    """
    opt = {**spec["optimizer"], "schedule": dict(spec["optimizer"]["schedule"])}
    if opt["schedule"]["kind"] == "cosine" and not opt["schedule"]["total_steps"] and owed:
        opt["schedule"]["total_steps"] = max(owed)
    return opt
