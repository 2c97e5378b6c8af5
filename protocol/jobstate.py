"""A job's state, as the scheduler keeps it and every client reads it.

A job only moves forward: queued -> running -> one final state (a
scheduler restart puts running jobs back to queued: they resume). The
members are strings on the wire and on disk (`JobState.QUEUED == "queued"`).
"""
from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    @property
    def rank(self) -> int:
        """0 queued, 1 running, 2 ended: a job's rank never goes down."""
        return 0 if self is JobState.QUEUED else 1 if self is JobState.RUNNING else 2


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
