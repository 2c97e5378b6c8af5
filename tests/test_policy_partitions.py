"""Consistency policies (ps/policy.py) whose members are data partitions
("p0", "p1", ...) held by workers: hand-written scenarios, action lists
compared exactly, as in tests/test_policy.py. No sockets, no sleeps."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest

from protocol.errors import ErrorCode
from protocol.messages import SliceData
from protocol.plan import make_plan
from ps.optim import make_optimizer
from ps.policy import (
    ASP,
    BSP,
    SSP,
    Accumulate,
    Answer,
    Apply,
    ApplyMean,
    Duplicate,
    Park,
    Policy,
    Refuse,
    Release,
    make_policy,
)
from ps.table import JobTable
from tests.test_policy import refused


def reassigned(worker: str, key: str, done: int, clock: int, epoch: int) -> str:
    return (f"worker {worker!r} holds {key!r}, which has completed {done} steps: it must push "
            f"step {done} before it can read step {clock} (membership epoch {epoch}); "
            "ask the scheduler for its partitions")


def snapshot(p: Policy) -> tuple:
    return p.state(), p.parked(), {w: p.held_by(w) for w in ("A", "B", "C", "")}


# --- 1. BSP: weighted pushes, one barrier over all partitions ----------------------

def test_bsp_partitions_count_once_each_in_the_barrier():
    p = BSP()
    assert p.on_membership(1, {"p0": -1, "p1": -1, "p2": -1}, {"p0": "A", "p1": "A", "p2": "B"}) == []
    assert p.clocks == {"p0": 0, "p1": 0, "p2": 0}
    assert p.holders == {"p0": "A", "p1": "A", "p2": "B"}
    assert p.held_by("A") == frozenset({"p0", "p1"}) and p.held_by("B") == frozenset({"p2"})
    assert p.on_pull("A", 0, "pa0") == [Answer("pa0")]
    assert p.on_pull("B", 0, "pb0") == [Answer("pb0")]
    assert p.on_push("A", 0, "xa0", keys=("p0", "p1")) == [Accumulate("xa0", 0, 2)]
    assert p.pending == 2 and p.version == 0
    assert p.clocks == {"p0": 1, "p1": 1, "p2": 0}
    assert p.on_pull("A", 1, "pa1") == [Park("pa1")]
    assert p.on_pull("A", 1, "pa1b") == [Park("pa1b")]
    assert p.on_push("B", 0, "xb0", keys=["p2"]) == [
        Accumulate("xb0", 0, 1), ApplyMean(0, 3), Release(("pa1", "pa1b"))]
    assert p.version == 1 and p.pending == 0 and p.parked() == {}
    assert p.clocks == {"p0": 1, "p1": 1, "p2": 1}
    # Second step, the other way round.
    assert p.on_push("B", 1, "xb1", keys=("p2",)) == [Accumulate("xb1", 1, 1)]
    assert p.on_pull("B", 2, "pb2") == [Park("pb2")]
    assert p.on_push("A", 1, "xa1", keys=("p1", "p0")) == [
        Accumulate("xa1", 1, 2), ApplyMean(1, 3), Release(("pb2",))]
    assert p.version == 2 and p.clocks == {"p0": 2, "p1": 2, "p2": 2}


def test_bsp_worker_that_holds_partitions_is_not_itself_a_member():
    p = BSP()
    p.on_membership(1, {"p0": -1}, {"p0": "A"})
    refused(p.on_push("A", 0, "x"), ErrorCode.NOT_MEMBER, "'A'", "epoch 1")   # no keys: A as member
    assert p.pending == 0 and p.clocks == {"p0": 0}


# --- 2. BSP: a partition nobody holds blocks the barrier ---------------------------

def test_bsp_unheld_partition_blocks_until_given_and_pushed():
    p = BSP()
    assert p.on_membership(1, {"p0": -1, "p1": -1, "p2": -1}, {"p0": "A", "p1": "A", "p2": ""}) == []
    assert p.held_by("") == frozenset()
    refused(p.on_push("", 0, "nobody", keys=("p2",)), ErrorCode.NOT_MEMBER)
    refused(p.on_pull("B", 0, "pb0"), ErrorCode.NOT_MEMBER, "'B'")         # B holds nothing yet
    assert p.on_push("A", 0, "xa0", keys=("p0", "p1")) == [Accumulate("xa0", 0, 2)]
    assert p.version == 0 and p.pending == 2                                # p2 has not pushed
    assert p.on_pull("A", 1, "pa1") == [Park("pa1")]
    # B is given p2: nothing completes, A's pull stays parked.
    assert p.on_membership(2, {"p0": -1, "p1": -1, "p2": -1}, {"p0": "A", "p1": "A", "p2": "B"}) == []
    assert p.clocks == {"p0": 1, "p1": 1, "p2": 0} and p.version == 0
    assert p.parked() == {"pa1": ("A", 1)}
    assert p.on_push("B", 0, "xb0", keys=("p2",)) == [
        Accumulate("xb0", 0, 1), ApplyMean(0, 3), Release(("pa1",))]
    assert p.version == 1 and p.clocks == {"p0": 1, "p1": 1, "p2": 1}


# --- 3. BSP: REASSIGNED -------------------------------------------------------------

def test_bsp_worker_given_a_behind_partition_is_told_reassigned():
    p = BSP()
    p.on_membership(1, {"p0": -1, "p1": -1, "p2": -1}, {"p0": "A", "p1": "B", "p2": "C"})
    assert p.on_push("A", 0, "xa0", keys=("p0",)) == [Accumulate("xa0", 0, 1)]
    assert p.on_push("C", 0, "xc0", keys=("p2",)) == [Accumulate("xc0", 0, 1)]
    assert p.on_pull("A", 1, "pa1") == [Park("pa1")]
    assert p.on_pull("C", 1, "pc1") == [Park("pc1")]
    # B died before pushing step 0; A takes p1 over.
    assert p.on_membership(2, {"p0": -1, "p1": -1, "p2": -1}, {"p0": "A", "p1": "A", "p2": "C"}) == [
        Refuse("pa1", ErrorCode.REASSIGNED, reassigned("A", "p1", 0, 1, 2))]
    assert p.parked() == {"pc1": ("C", 1)}                                  # C's pull is not affected
    assert p.version == 0 and p.pending == 2
    # Asking again is refused at once, not parked (it would wait on itself).
    assert p.on_pull("A", 1, "again") == [Refuse("again", ErrorCode.REASSIGNED, reassigned("A", "p1", 0, 1, 2))]
    assert p.parked() == {"pc1": ("C", 1)}
    assert p.on_pull("A", 0, "pa0") == [Answer("pa0")]                      # a step already readable
    assert p.on_push("A", 0, "xa0-p1", keys=("p1",)) == [
        Accumulate("xa0-p1", 0, 1), ApplyMean(0, 3), Release(("pc1",))]
    assert p.on_pull("A", 1, "pa1") == [Answer("pa1")]


def test_bsp_pull_from_a_worker_holding_a_behind_partition_is_refused_at_once():
    p = BSP()
    p.on_membership(1, {"p0": -1, "p1": -1, "p2": -1}, {"p0": "A", "p1": "A", "p2": "B"})
    assert p.on_push("A", 0, "xa0", keys=("p0",)) == [Accumulate("xa0", 0, 1)]   # p1 not pushed
    assert p.on_pull("A", 1, "pa1") == [Refuse("pa1", ErrorCode.REASSIGNED, reassigned("A", "p1", 0, 1, 1))]
    assert p.parked() == {}
    assert p.on_pull("B", 1, "pb1") == [Refuse("pb1", ErrorCode.REASSIGNED, reassigned("B", "p2", 0, 1, 1))]
    assert p.parked() == {} and p.pending == 1 and p.version == 0


def test_bsp_partition_added_behind_a_parked_pull_is_reassigned():
    p = BSP()
    p.on_membership(1, {"p0": -1, "p1": -1}, {"p0": "A", "p1": "B"})
    p.on_push("A", 0, "xa0", keys=("p0",))
    assert p.on_pull("A", 1, "pa1") == [Park("pa1")]
    # A new partition joins the open step (0) and is given to A.
    assert p.on_membership(2, {"p0": -1, "p1": -1, "p5": 3}, {"p0": "A", "p1": "B", "p5": "A"}) == [
        Refuse("pa1", ErrorCode.REASSIGNED, reassigned("A", "p5", 0, 1, 2))]
    assert p.clocks == {"p0": 1, "p1": 0, "p5": 0}


# --- 4. Duplicate ------------------------------------------------------------------------

def test_bsp_repeat_of_a_completed_step_is_a_duplicate_and_changes_nothing():
    p = BSP()
    p.on_membership(1, {"p0": -1, "p1": -1}, {"p0": "A", "p1": "B"})
    p.on_push("A", 0, "xa0", keys=("p0",))
    # A retries its push before the barrier completes: counted once.
    before = snapshot(p)
    assert p.on_push("A", 0, "xa0-retry", keys=("p0",)) == [Duplicate("xa0-retry")]
    assert snapshot(p) == before and p.pending == 1
    assert p.on_push("B", 0, "xb0", keys=("p1",)) == [Accumulate("xb0", 0, 1), ApplyMean(0, 2)]
    # B dies after its push was applied; A takes p1 and sends B's step again.
    assert p.on_membership(2, {"p0": -1, "p1": -1}, {"p0": "A", "p1": "A"}) == []
    before = snapshot(p)
    assert p.on_push("A", 0, "again-p1", keys=("p1",)) == [Duplicate("again-p1")]
    assert p.on_push("A", 0, "again-both", keys=("p0", "p1")) == [Duplicate("again-both")]
    assert snapshot(p) == before
    assert p.version == 1 and p.pending == 0 and p.clocks == {"p0": 1, "p1": 1}


def test_bsp_push_with_only_some_keys_behind_is_bad_clock():
    p = BSP()
    p.on_membership(1, {"p0": -1, "p1": -1}, {"p0": "A", "p1": "B"})
    p.on_push("A", 0, "xa0", keys=("p0",))
    p.on_push("B", 0, "xb0", keys=("p1",))
    assert p.on_push("A", 1, "xa1", keys=("p0",)) == [Accumulate("xa1", 1, 1)]
    p.on_membership(2, {"p0": -1, "p1": -1}, {"p0": "A", "p1": "A"})
    before = snapshot(p)
    r = refused(p.on_push("A", 1, "mixed", keys=("p0", "p1")), ErrorCode.BAD_CLOCK)
    assert r == Refuse("mixed", ErrorCode.BAD_CLOCK,
                       "partition 'p0' pushed step 1 but has completed 2 steps already: "
                       "expected clock 2 once step 1 completes")
    assert snapshot(p) == before
    assert p.on_push("A", 1, "xa1-p1", keys=("p1",)) == [Accumulate("xa1-p1", 1, 1), ApplyMean(1, 2)]


def test_asp_and_ssp_repeat_is_duplicate_mixed_is_bad_clock():
    for p in (ASP(), SSP(2)):
        p.on_membership(1, {"p0": -1, "p1": -1}, {"p0": "A", "p1": "A"})
        assert p.on_push("A", 0, "x0", keys=("p0", "p1")) == [Apply("x0", 0)]
        assert p.on_push("A", 1, "x1", keys=("p0",)) == [Apply("x1", 0)]
        before = snapshot(p)
        assert p.on_push("A", 0, "dup", keys=("p1", "p0")) == [Duplicate("dup")], p.name
        refused(p.on_push("A", 1, "mixed", keys=("p0", "p1")), ErrorCode.BAD_CLOCK,
                "partition 'p0'", "step 1", "expected a clock >= 2")
        assert snapshot(p) == before
        assert p.version == 2 and p.clocks == {"p0": 2, "p1": 1}


# --- 5. NOT_MEMBER -----------------------------------------------------------------------

def test_not_member_refusals_with_partitions():
    p = BSP()
    p.on_membership(1, {"p0": -1, "p1": -1}, {"p0": "A", "p1": "B"})
    assert p.on_push("A", 0, "x", keys=("p1",)) == [
        Refuse("x", ErrorCode.NOT_MEMBER, "worker 'A' does not hold 'p1' in membership epoch 1")]
    refused(p.on_push("A", 0, "both", keys=("p0", "p1")), ErrorCode.NOT_MEMBER, "'A'", "'p1'")
    refused(p.on_push("A", 0, "unknown", keys=("p0", "p7")), ErrorCode.NOT_MEMBER, "'p7'")
    assert p.on_pull("C", 0, "pc0") == [
        Refuse("pc0", ErrorCode.NOT_MEMBER, "worker 'C' is not a member of the job in membership epoch 1")]
    assert p.on_pull("C", -1, "read") == [Answer("read")]                   # plain reads: anyone
    assert p.pending == 0 and p.clocks == {"p0": 0, "p1": 0} and p.parked() == {}


def test_worker_that_lost_all_its_partitions_while_parked_is_not_member():
    p = BSP()
    p.on_membership(1, {"p0": -1, "p1": -1}, {"p0": "A", "p1": "B"})
    p.on_push("A", 0, "xa0", keys=("p0",))
    assert p.on_pull("A", 1, "pa1") == [Park("pa1")]
    assert p.on_membership(2, {"p0": -1, "p1": -1}, {"p0": "B", "p1": "B"}) == [
        Refuse("pa1", ErrorCode.NOT_MEMBER, "worker 'A' left the job in membership epoch 2")]
    assert p.parked() == {} and p.held_by("A") == frozenset()
    refused(p.on_pull("A", 1, "pa1-again"), ErrorCode.NOT_MEMBER, "'A'", "epoch 2")
    refused(p.on_push("A", 1, "xa1", keys=("p0",)), ErrorCode.NOT_MEMBER, "'p0'")
    refused(p.on_push("B", 0, "mixed", keys=("p0", "p1")), ErrorCode.BAD_CLOCK, "'p0'")
    assert p.on_push("B", 0, "xb0", keys=("p1",)) == [Accumulate("xb0", 0, 1), ApplyMean(0, 2)]


# --- 6. SSP ----------------------------------------------------------------------------

def test_ssp_horizon_follows_the_slowest_partition_held_or_not():
    p = SSP(1)
    assert p.on_membership(1, {"p0": -1, "p1": -1, "p2": -1}, {"p0": "A", "p1": "A", "p2": ""}) == []
    assert p.clocks == {"p0": 0, "p1": 0, "p2": 0}
    assert p.on_push("A", 0, "x0", keys=("p0", "p1"), base_version=0) == [Apply("x0", 0)]
    assert p.clocks == {"p0": 1, "p1": 1, "p2": 0} and p.version == 1
    assert p.on_pull("A", 1, "pa1") == [Answer("pa1")]                      # 1 - 1 <= slowest 0
    assert p.on_pull("A", 2, "pa2") == [Park("pa2")]                        # unheld p2 at 0 holds it
    # A pushes p0 only: p0 at 2, p1 at 1; the horizon is still p2's.
    assert p.on_push("A", 1, "x1", keys=("p0",), base_version=1) == [Apply("x1", 0)]
    assert p.clocks == {"p0": 2, "p1": 1, "p2": 0} and p.parked() == {"pa2": ("A", 2)}
    # Reading step 3 needs p1 >= 2, which only A can push: refused at once.
    assert p.on_pull("A", 3, "pa3") == [Refuse("pa3", ErrorCode.REASSIGNED, reassigned("A", "p1", 1, 3, 1))]
    # p2 is given to B, who is behind by two updates.
    assert p.on_membership(2, {"p0": -1, "p1": -1, "p2": -1}, {"p0": "A", "p1": "A", "p2": "B"}) == []
    assert p.parked() == {"pa2": ("A", 2)}
    assert p.on_push("B", 0, "xb0", keys=("p2",), base_version=0) == [Apply("xb0", 2), Release(("pa2",))]
    assert p.clocks == {"p0": 2, "p1": 1, "p2": 1} and p.version == 3
    assert p.on_pull("B", 2, "pb2") == [Answer("pb2")]                      # slowest 1 + 1
    assert p.on_pull("B", 3, "pb3") == [Refuse("pb3", ErrorCode.REASSIGNED, reassigned("B", "p2", 1, 3, 2))]


def test_ssp_staleness_bound_with_two_keys_per_worker():
    p = SSP(0)
    p.on_membership(1, {"p0": -1, "p1": -1, "p2": -1}, {"p0": "A", "p1": "A", "p2": "B"})
    assert p.on_push("A", 0, "xa0", keys=("p0", "p1")) == [Apply("xa0", 0)]
    assert p.on_pull("A", 1, "pa1") == [Park("pa1")]                        # p2 at 0 > 1 - 0
    assert p.on_push("B", 0, "xb0", keys=("p2",)) == [Apply("xb0", 0), Release(("pa1",))]
    assert p.on_push("A", 1, "xa1", keys=("p0", "p1")) == [Apply("xa1", 0)]
    assert p.on_pull("A", 2, "pa2") == [Park("pa2")]
    assert p.on_pull("B", 1, "pb1") == [Answer("pb1")]
    assert p.on_push("B", 1, "xb1", keys=("p2",)) == [Apply("xb1", 0), Release(("pa2",))]
    assert p.clocks == {"p0": 2, "p1": 2, "p2": 2} and p.version == 4


def test_ssp_joining_partition_takes_the_slowest_clock_of_those_that_stay():
    p = SSP(1)
    p.on_membership(1, {"p0": 4, "p1": 6}, {"p0": "A", "p1": "B"})
    p.on_membership(2, {"p0": -1, "p1": -1, "p2": -1, "p3": 2}, {"p0": "A", "p1": "B", "p2": "", "p3": "B"})
    assert p.clocks == {"p0": 4, "p1": 6, "p2": 4, "p3": 2}
    assert p.holders == {"p0": "A", "p1": "B", "p2": "", "p3": "B"}
    assert p.held_by("B") == frozenset({"p1", "p3"})


# --- 7. ASP --------------------------------------------------------------------------

def test_asp_one_apply_per_push_whatever_the_number_of_keys():
    p = ASP()
    p.on_membership(1, {"p0": -1, "p1": -1, "p2": -1}, {"p0": "A", "p1": "A", "p2": "B"})
    assert p.on_push("A", 0, "xa0", keys=("p0", "p1"), base_version=0) == [Apply("xa0", 0)]
    assert p.version == 1 and p.clocks == {"p0": 1, "p1": 1, "p2": 0}
    assert p.on_push("B", 0, "xb0", keys=("p2",), base_version=0) == [Apply("xb0", 1)]
    assert p.version == 2 and p.clocks == {"p0": 1, "p1": 1, "p2": 1}
    assert p.on_push("A", 5, "xa5", keys=("p1", "p0")) == [Apply("xa5", 0)]   # skipping ahead
    assert p.clocks == {"p0": 6, "p1": 6, "p2": 1}
    assert p.on_push("A", -1, "u", keys=("p0",)) == [Apply("u", 0)]           # unclocked
    assert p.version == 4 and p.clocks == {"p0": 6, "p1": 6, "p2": 1}
    assert p.on_pull("A", 100, "far") == [Answer("far")]
    assert p.on_pull("B", 100, "far-b") == [Answer("far-b")]
    refused(p.on_pull("C", 0, "c"), ErrorCode.NOT_MEMBER, "'C'")
    assert p.parked() == {}


# --- 8. A finished partition leaves -------------------------------------------------------

def test_bsp_removing_the_partition_the_barrier_waited_on_completes_it():
    p = BSP()
    p.on_membership(1, {"p0": -1, "p1": -1, "p2": -1}, {"p0": "A", "p1": "A", "p2": "B"})
    assert p.on_push("A", 0, "xa0", keys=("p0", "p1")) == [Accumulate("xa0", 0, 2)]
    assert p.on_pull("A", 1, "pa1") == [Park("pa1")]
    assert p.on_membership(2, {"p0": -1, "p1": -1}, {"p0": "A", "p1": "A"}) == [
        ApplyMean(0, 2), Release(("pa1",))]
    assert p.version == 1 and p.pending == 0 and p.clocks == {"p0": 1, "p1": 1}
    assert p.held_by("B") == frozenset()
    assert p.on_push("A", 1, "xa1", keys=("p0", "p1")) == [Accumulate("xa1", 1, 2), ApplyMean(1, 2)]


def test_bsp_removing_an_unheld_partition_completes_the_barrier():
    p = BSP()
    p.on_membership(1, {"p0": -1, "p1": -1}, {"p0": "A", "p1": ""})
    assert p.on_push("A", 0, "xa0", keys=("p0",)) == [Accumulate("xa0", 0, 1)]
    assert p.on_pull("A", 1, "pa1") == [Park("pa1")]
    assert p.on_membership(2, {"p0": -1}, {"p0": "A"}) == [ApplyMean(0, 1), Release(("pa1",))]


def test_ssp_removing_the_slowest_partition_releases():
    p = SSP(0)
    p.on_membership(1, {"p0": -1, "p1": -1}, {"p0": "A", "p1": "B"})
    assert p.on_push("A", 0, "xa0", keys=("p0",)) == [Apply("xa0", 0)]
    assert p.on_pull("A", 1, "pa1") == [Park("pa1")]
    assert p.on_membership(2, {"p0": -1}, {"p0": "A"}) == [Release(("pa1",))]
    assert p.clocks == {"p0": 1}


# --- 9. Legacy members ----------------------------------------------------------------

@pytest.mark.parametrize("make", [ASP, BSP, lambda: SSP(1)], ids=["asp", "bsp", "ssp"])
def test_legacy_worker_members_unchanged(make):
    p = make()
    p.on_membership(1, {"a": -1, "b": -1})
    assert p.holders == {}
    assert p.held_by("a") == frozenset({"a"})
    first = p.on_push("a", 0, "xa0")
    assert first == ([Accumulate("xa0", 0, 1)] if p.name == "bsp" else [Apply("xa0", 0)])
    before = snapshot(p)
    refused(p.on_push("a", 0, "stale"), ErrorCode.BAD_CLOCK, "worker 'a'", "step 0")   # not Duplicate
    assert snapshot(p) == before
    refused(p.on_push("a", 0, "keyed", keys=("b",)), ErrorCode.NOT_MEMBER, "'a'", "'b'")


def test_holders_of_unknown_keys_are_dropped():
    p = BSP()
    p.on_membership(1, {"p0": -1}, {"p0": "A", "p9": "B"})
    assert p.holders == {"p0": "A"} and p.held_by("B") == frozenset()
    refused(p.on_pull("B", 0, "pb0"), ErrorCode.NOT_MEMBER, "'B'")
    refused(p.on_push("B", 0, "xb0", keys=("p9",)), ErrorCode.NOT_MEMBER, "'p9'")


# --- 10. state round trip -------------------------------------------------------------

@pytest.mark.parametrize("make", [ASP, BSP, lambda: SSP(2)], ids=["asp", "bsp", "ssp"])
def test_state_round_trip_keeps_holders(make):
    p = make()
    p.on_membership(4, {"p0": -1, "p1": -1, "p2": -1}, {"p0": "A", "p1": "A", "p2": ""})
    p.on_push("A", 0, "xa0", keys=("p0", "p1"))
    st = p.state()
    assert st["holders"] == {"p0": "A", "p1": "A", "p2": ""}
    wire = msgpack.unpackb(msgpack.packb(st), strict_map_key=False)
    for q in (Policy.from_state(wire), type(p).from_state(wire)):
        assert type(q) is type(p)
        assert q.state() == st
        assert q.holders == {"p0": "A", "p1": "A", "p2": ""}
        assert q.held_by("A") == frozenset({"p0", "p1"})
        assert q.held_by("") == frozenset() and q.held_by("B") == frozenset()
    q = Policy.from_state(wire)
    refused(q.on_push("B", 0, "x", keys=("p2",)), ErrorCode.NOT_MEMBER, "'p2'")
    # The restored policy behaves as the original: a repeat is a Duplicate,
    # and giving p2 to B lets B's push count.
    assert q.on_push("A", 0, "dup", keys=("p0", "p1")) == p.on_push("A", 0, "dup", keys=("p0", "p1")) == [
        Duplicate("dup")]
    m = (5, {"p0": -1, "p1": -1, "p2": -1}, {"p0": "A", "p1": "A", "p2": "B"})
    assert q.on_membership(*m) == p.on_membership(*m)
    assert q.on_push("B", 0, "xb0", keys=("p2",)) == p.on_push("B", 0, "xb0", keys=("p2",))
    assert q.state() == p.state()
    assert q.held_by("B") == frozenset({"p2"})


def test_bsp_restored_mid_barrier_completes_with_the_full_weight():
    p = BSP()
    p.on_membership(1, {"p0": -1, "p1": -1, "p2": -1}, {"p0": "A", "p1": "A", "p2": "B"})
    p.on_push("A", 0, "xa0", keys=("p0", "p1"))
    q = BSP.from_state(msgpack.unpackb(msgpack.packb(p.state()), strict_map_key=False))
    assert q.pending == 2
    assert q.on_push("B", 0, "xb0", keys=("p2",)) == [Accumulate("xb0", 0, 1), ApplyMean(0, 3)]


def test_state_without_holders_reads_as_legacy():
    st = {"name": "bsp", "staleness": 0, "version": 0, "epoch": 1, "clocks": {"a": 0}, "pending": 0}
    q = Policy.from_state(st)
    assert q.holders == {} and q.held_by("a") == frozenset({"a"})
    assert q.on_push("a", 0, "x") == [Accumulate("x", 0, 1), ApplyMean(0, 1)]


# --- 11. JobTable: a weighted push counts as its partitions ------------------------------

def _table(plan, initial):
    return JobTable("j", plan, 0, make_optimizer({"kind": "sgd", "lr": 1.0}), make_policy({"policy": "bsp"}),
                    nonlearned=("bn",), initial=initial)


@pytest.mark.parametrize("grad_scale", [1.0, 0.25])
def test_weighted_accumulate_equals_one_push_per_partition(grad_scale):
    plan = make_plan({"w": ((7,), "float32"), "bn": ((3,), "float32")}, 1, 1 << 20)
    sid = {s.name: s.sid for s in plan.slices}
    assert len(plan.slices) == 2
    rng = np.random.default_rng(7)
    initial = {sid[name]: rng.standard_normal(n).astype(np.float32) for name, n in (("w", 7), ("bn", 3))}
    g = [{name: rng.standard_normal(n).astype(np.float32) for name, n in (("w", 7), ("bn", 3))}
         for _ in range(3)]

    def push(grads):
        return [SliceData(sid[name], grads[name]) for name in ("w", "bn")]

    # Three partitions: A holds p0, p1 and pushes mean(g0, g1); B holds p2 and pushes g2.
    weighted = _table(plan, initial)
    policy = weighted.policy
    policy.on_membership(1, {"p0": -1, "p1": -1, "p2": -1}, {"p0": "A", "p1": "A", "p2": "B"})
    mean01 = {name: ((g[0][name] + g[1][name]) / np.float32(2)).astype(np.float32) for name in ("w", "bn")}
    actions = policy.on_push("A", 0, "a", keys=("p0", "p1")) + policy.on_push("B", 0, "b", keys=("p2",))
    assert actions == [Accumulate("a", 0, 2), Accumulate("b", 0, 1), ApplyMean(0, 3)]
    payload = {"a": mean01, "b": g[2]}
    for act in actions:
        if isinstance(act, Accumulate):
            weighted.accumulate(act.step, push(payload[act.push]), grad_scale=grad_scale, weight=act.weight)
        else:
            weighted.apply_mean(act.step, act.count)

    # The same with one push per partition.
    plain = _table(plan, initial)
    for gi in g:
        plain.accumulate(0, push(gi), grad_scale=grad_scale)
    plain.apply_mean(0, 3)

    mean = {name: (g[0][name] + g[1][name] + g[2][name]) / 3 for name in ("w", "bn")}
    expect_w = initial[sid["w"]] - grad_scale * mean["w"]            # sgd, lr 1: scaled
    expect_bn = initial[sid["bn"]] + mean["bn"]                      # running stats: a delta, unscaled
    for table in (weighted, plain):
        np.testing.assert_allclose(table.values[sid["w"]], expect_w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(table.values[sid["bn"]], expect_bn, rtol=1e-5, atol=1e-6)
        assert table.pending_sums() == 0
    np.testing.assert_allclose(weighted.values[sid["w"]], plain.values[sid["w"]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weighted.values[sid["bn"]], plain.values[sid["bn"]], rtol=1e-5, atol=1e-6)
    assert weighted.pushes == 2 and plain.pushes == 3
    # The pushed arrays are only read.
    np.testing.assert_array_equal(mean01["w"], ((g[0]["w"] + g[1]["w"]) / np.float32(2)).astype(np.float32))


def test_weighted_accumulate_first_push_is_scaled_too():
    """The weight applies to the push that opens the sum, not only to later ones."""
    plan = make_plan({"w": ((4,), "float32")}, 1, 1 << 20)
    table = JobTable("j", plan, 0, make_optimizer({"kind": "sgd", "lr": 1.0}), make_policy({"policy": "bsp"}),
                     initial={0: np.zeros(4, np.float32)})
    table.accumulate(0, [SliceData(0, np.full(4, 3.0, np.float32))], weight=2)
    table.accumulate(0, [SliceData(0, np.full(4, 6.0, np.float32))], weight=1)
    table.apply_mean(0, 3)
    np.testing.assert_allclose(table.values[0], np.full(4, -4.0, np.float32))   # -(2*3 + 6) / 3


# --- 12. A key named twice --------------------------------------------------------------

@pytest.mark.parametrize("make", [ASP, BSP, lambda: SSP(1)], ids=["asp", "bsp", "ssp"])
def test_key_named_twice_is_bad_field(make):
    p = make()
    p.on_membership(1, {"p0": -1, "p1": -1}, {"p0": "A", "p1": "A"})
    before = snapshot(p)
    assert p.on_push("A", 0, "x", keys=("p0", "p1", "p0")) == [
        Refuse("x", ErrorCode.BAD_FIELD, "a push names one of its partitions twice")]
    assert snapshot(p) == before
    refused(p.on_push("B", 0, "y", keys=["p1", "p1"]), ErrorCode.BAD_FIELD, "twice")
    assert snapshot(p) == before
