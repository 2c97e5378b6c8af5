"""Staleness, end to end on a real shard: measured, shown, and (optionally) used to scale the step."""
from __future__ import annotations

import numpy as np

from protocol.plan import make_plan
from worker.client import ParamClient

PLAN = make_plan({"w": ((8,), "float32")}, 1, 1 << 20)


def clients(shard, n, **create):
    made = [ParamClient([shard.endpoint], PLAN, job="st", worker=f"w{i}", timeout_s=10) for i in range(n)]
    made[0].create({"w": np.zeros(8, np.float32)}, **create)
    return made


def test_staleness_aware_asp_scales_a_stale_push(shard_factory):
    shard = shard_factory()
    fresh, stale = clients(shard, 2, optimizer={"kind": "sgd", "lr": 1.0, "staleness_aware": True})
    ones = {"w": np.ones(8, np.float32)}
    stale.pull(clock=-1)                  # stale computes from version 0 ...
    for step in range(3):                 # ... while fresh moves the table to version 3
        fresh.push_pull(ones, clock=step)
    out = stale.push_pull(ones, clock=0)  # applied 3 versions late: lr / 3
    expected = np.float32(-3.0) - np.float32(1.0) * np.float32(1.0 / 3.0)
    np.testing.assert_allclose(out["w"], np.full(8, expected), rtol=1e-6)
    hist = fresh.stats()[0]["jobs"]["st"]["staleness_hist"]
    assert hist == {"0": 3, "3": 1}
    assert stale.versions == [4]          # the reply says which version it reflects


def test_without_the_option_a_stale_push_counts_in_full(shard_factory):
    shard = shard_factory()
    fresh, stale = clients(shard, 2, optimizer={"kind": "sgd", "lr": 1.0})
    ones = {"w": np.ones(8, np.float32)}
    stale.pull(clock=-1)
    for step in range(3):
        fresh.push_pull(ones, clock=step)
    np.testing.assert_array_equal(stale.push_pull(ones, clock=0)["w"], np.full(8, -4.0, np.float32))
