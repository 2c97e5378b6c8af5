"""Consistency policies (ps/policy.py): hand-written scenarios, action lists
compared exactly. No sockets, no sleeps: events in, actions out."""
from __future__ import annotations

import msgpack
import pytest

from protocol.errors import ErrorCode
from protocol.jobspec import POLICIES as JOB_POLICIES
from protocol.jobspec import SpecError, normalize_section
from ps.policy import (
    ASP,
    BSP,
    POLICIES,
    SSP,
    Accumulate,
    Answer,
    Apply,
    ApplyMean,
    Park,
    Policy,
    Refuse,
    Release,
    make_policy,
)


def refused(actions, code: ErrorCode, *words: str) -> Refuse:
    """The single action is a Refuse with `code` whose message has `words`."""
    assert len(actions) == 1 and isinstance(actions[0], Refuse), actions
    r = actions[0]
    assert r.code is code, r
    for w in words:
        assert w in r.message, r.message
    return r


# --- ASP ------------------------------------------------------------------------

def test_asp_applies_every_push_and_never_parks():
    p = ASP()
    assert p.on_membership(1, {"a": 0, "b": 0}) == []
    assert p.on_pull("a", 0, "pa0") == [Answer("pa0")]
    assert p.on_push("a", 0, "xa0", base_version=0) == [Apply("xa0", 0)]
    assert p.on_push("a", 1, "xa1", base_version=1) == [Apply("xa1", 0)]
    assert p.on_pull("a", 50, "pa50") == [Answer("pa50")]      # far ahead of b: still answered
    assert p.on_push("b", 0, "xb0", base_version=0) == [Apply("xb0", 2)]   # two updates since
    assert p.on_push("b", 7, "xb7") == [Apply("xb7", 0)]        # skipping ahead is allowed
    assert p.version == 4
    assert p.clocks == {"a": 2, "b": 8}
    assert p.parked() == {}


def test_asp_unclocked_push_applies_without_moving_clocks():
    p = ASP()
    assert p.on_push("a", -1, "x") == [Apply("x", 0)]
    assert p.clocks == {}                                       # open mode: not entered by it
    assert p.on_push("a", 3, "y", base_version=0) == [Apply("y", 1)]
    assert p.on_push("a", -1, "z") == [Apply("z", 0)]
    assert p.clocks == {"a": 4} and p.version == 3


def test_asp_stale_push_is_refused_and_counts_nothing():
    p = ASP()
    p.on_push("a", 0, "x0")
    p.on_push("a", 1, "x1")
    r = refused(p.on_push("a", 1, "again"), ErrorCode.BAD_CLOCK, "step 1", "expected a clock >= 2")
    assert r.request == "again"
    assert p.version == 2 and p.clocks == {"a": 2}


# --- BSP ------------------------------------------------------------------------

def test_bsp_two_workers_accumulate_then_one_mean_then_release():
    p = BSP()
    p.on_membership(1, {"a": -1, "b": -1})
    assert p.clocks == {"a": 0, "b": 0}
    assert p.on_pull("a", 0, "pa0") == [Answer("pa0")]
    assert p.on_pull("b", 0, "pb0") == [Answer("pb0")]
    assert p.on_push("a", 0, "xa0") == [Accumulate("xa0", 0)]
    assert p.on_pull("a", 1, "pa1") == [Park("pa1")]
    assert p.parked() == {"pa1": ("a", 1)}
    assert p.on_push("b", 0, "xb0") == [Accumulate("xb0", 0), ApplyMean(0, 2), Release(("pa1",))]
    assert p.version == 1 and p.clocks == {"a": 1, "b": 1} and p.parked() == {}
    assert p.on_pull("b", 1, "pb1") == [Answer("pb1")]
    assert p.on_pull("b", 2, "pb2") == [Park("pb2")]
    assert p.on_push("b", 1, "xb1") == [Accumulate("xb1", 1)]
    assert p.on_push("a", 1, "xa1") == [Accumulate("xa1", 1), ApplyMean(1, 2), Release(("pb2",))]


def test_bsp_single_worker_open_mode_is_lock_step():
    p = BSP()
    assert p.on_pull("w", 0, "p0") == [Answer("p0")]
    assert p.on_push("w", 0, "x0") == [Accumulate("x0", 0), ApplyMean(0, 1)]
    assert p.on_pull("w", 1, "p1") == [Answer("p1")]


def test_bsp_refusals():
    p = BSP()
    p.on_membership(1, {"a": -1, "b": -1})
    refused(p.on_push("a", -1, "u"), ErrorCode.BAD_CLOCK, "clock -1", "expected clock 0")
    refused(p.on_push("a", 1, "ahead"), ErrorCode.BAD_CLOCK, "bsp is at step 0", "step 1", "expected clock 0")
    assert p.on_push("a", 0, "xa0") == [Accumulate("xa0", 0)]
    refused(p.on_push("a", 0, "dup"), ErrorCode.BAD_CLOCK, "step 0", "expected clock 1 once step 0 completes")
    refused(p.on_push("a", 1, "early"), ErrorCode.BAD_CLOCK, "expected clock 1 once step 0 completes")
    refused(p.on_push("c", 0, "xc0"), ErrorCode.NOT_MEMBER, "'c'", "epoch 1")
    refused(p.on_pull("c", 0, "pc0"), ErrorCode.NOT_MEMBER, "'c'")
    assert p.pending == 1 and p.version == 0 and p.clocks == {"a": 1, "b": 0}


def test_bsp_removing_a_straggler_completes_the_barrier_and_releases():
    p = BSP()
    p.on_membership(1, {"a": -1, "b": -1})
    p.on_push("a", 0, "xa0")
    assert p.on_pull("a", 1, "pa1") == [Park("pa1")]
    assert p.on_membership(2, {"a": -1}) == [ApplyMean(0, 1), Release(("pa1",))]
    assert p.clocks == {"a": 1} and p.version == 1


def test_bsp_push_of_a_worker_that_left_still_counts():
    p = BSP()
    p.on_membership(1, {"a": -1, "b": -1})
    p.on_push("a", 0, "xa0")
    assert p.on_membership(2, {"b": -1}) == []
    refused(p.on_push("a", 1, "xa1"), ErrorCode.NOT_MEMBER)
    assert p.on_push("b", 0, "xb0") == [Accumulate("xb0", 0), ApplyMean(0, 2)]


def test_bsp_everyone_gone_applies_what_was_acknowledged():
    p = BSP()
    p.on_membership(1, {"a": -1, "b": -1})
    p.on_push("a", 0, "xa0")
    p.on_pull("a", 1, "pa1")
    assert p.on_membership(2, {}) == [
        Refuse("pa1", ErrorCode.NOT_MEMBER, "worker 'a' left the job in membership epoch 2"),
        ApplyMean(0, 1),
    ]
    assert p.version == 1 and p.clocks == {} and p.parked() == {} and p.min_clock() is None
    assert p.on_membership(3, {}) == []                          # nothing pending: no empty mean


def test_bsp_joiner_enters_the_open_barrier_whatever_its_start():
    p = BSP()
    p.on_membership(1, {"a": -1})
    p.on_push("a", 0, "xa0")
    assert p.version == 1
    p.on_push("a", 1, "xa1")                                     # applied: a is alone
    assert p.version == 2
    assert p.on_pull("a", 3, "pa3") == [Park("pa3")]
    # b joins with stale (0) or future (9) start: both take the open step 2.
    assert p.on_membership(2, {"a": -1, "b": 0, "c": 9}) == []
    assert p.clocks == {"a": 2, "b": 2, "c": 2}
    p.on_push("a", 2, "xa2")
    p.on_push("b", 2, "xb2")
    assert p.on_push("c", 2, "xc2") == [Accumulate("xc2", 2), ApplyMean(2, 3), Release(("pa3",))]


def test_bsp_open_mode_entry_takes_the_open_step():
    p = BSP()
    p.on_push("a", 0, "xa0")                                      # a alone: barrier done
    assert p.version == 1
    assert p.on_pull("late", 0, "pl0") == [Answer("pl0")]        # an old step: answered
    assert p.clocks["late"] == 1                                  # but it joins step 1
    refused(p.on_push("late", 0, "xl0"), ErrorCode.BAD_CLOCK, "expected clock 1")


# --- SSP ------------------------------------------------------------------------

def test_ssp_slow_worker_parks_the_fast_one_then_releases_it():
    p = SSP(1)
    p.on_membership(1, {"fast": 0, "slow": 0})
    assert p.on_pull("fast", 0, "f0") == [Answer("f0")]
    assert p.on_push("fast", 0, "xf0", base_version=0) == [Apply("xf0", 0)]
    assert p.on_pull("fast", 1, "f1") == [Answer("f1")]          # 1 - 1 <= slowest 0
    assert p.on_push("fast", 1, "xf1", base_version=1) == [Apply("xf1", 0)]
    assert p.on_pull("fast", 2, "f2") == [Park("f2")]            # 2 - 1 > 0
    assert p.on_pull("slow", 0, "s0") == [Answer("s0")]
    assert p.on_push("slow", 0, "xs0", base_version=0) == [Apply("xs0", 2), Release(("f2",))]
    assert p.version == 3 and p.clocks == {"fast": 2, "slow": 1}


def test_ssp_zero_is_lock_step_with_separate_updates():
    p = SSP(0)
    p.on_membership(1, {"a": 0, "b": 0})
    assert p.on_push("a", 0, "xa0") == [Apply("xa0", 0)]
    assert p.on_pull("a", 1, "pa1") == [Park("pa1")]
    assert p.on_push("b", 0, "xb0") == [Apply("xb0", 0), Release(("pa1",))]
    assert p.version == 2


def test_ssp_releases_in_arrival_order_only_what_may_go():
    p = SSP(0)
    p.on_membership(1, {"a": 0, "b": 0, "c": 0})
    p.on_push("a", 0, "xa0")
    p.on_push("a", 1, "xa1")
    p.on_push("b", 0, "xb0")
    assert p.on_pull("a", 2, "pa2") == [Park("pa2")]
    assert p.on_pull("b", 1, "pb1") == [Park("pb1")]
    assert p.on_push("c", 0, "xc0") == [Apply("xc0", 0), Release(("pb1",))]
    assert p.parked() == {"pa2": ("a", 2)}
    assert p.on_membership(2, {"a": -1}) == [Release(("pa2",))]   # b, c gone: a alone


def test_one_release_lets_pulls_go_in_arrival_order():
    p = SSP(0)
    p.on_membership(1, {"a": 0, "b": 0, "slow": 0})
    p.on_push("b", 0, "xb0")
    p.on_push("a", 0, "xa0")
    assert p.on_pull("b", 1, "pb1") == [Park("pb1")]
    assert p.on_pull("a", 1, "pa1") == [Park("pa1")]
    assert p.on_push("slow", 0, "xs0") == [Apply("xs0", 0), Release(("pb1", "pa1"))]


def test_ssp_refusals_and_skip_ahead():
    p = SSP(2)
    p.on_membership(1, {"a": 0})
    refused(p.on_push("a", -1, "u"), ErrorCode.BAD_CLOCK, "clock -1", "expected a clock >= 0")
    assert p.on_push("a", 4, "x4") == [Apply("x4", 0)]
    refused(p.on_push("a", 3, "x3"), ErrorCode.BAD_CLOCK, "step 3", "expected a clock >= 5")
    refused(p.on_push("z", 5, "xz"), ErrorCode.NOT_MEMBER, "'z'")
    refused(p.on_pull("a", -2, "bad"), ErrorCode.BAD_CLOCK, "clock -2")
    refused(p.on_push("a", -7, "bad"), ErrorCode.BAD_CLOCK, "clock -7")
    assert p.version == 1 and p.clocks == {"a": 5}


def test_ssp_removing_the_slow_worker_releases_and_its_pull_is_refused():
    p = SSP(0)
    p.on_membership(1, {"a": 3, "b": 1, "c": 5})
    assert p.on_pull("a", 3, "pa3") == [Park("pa3")]
    assert p.on_pull("c", 5, "pc5") == [Park("pc5")]
    assert p.on_pull("b", 2, "pb2") == [Park("pb2")]              # b asks ahead of itself
    assert p.on_membership(2, {"a": -1, "c": -1}) == [
        Refuse("pb2", ErrorCode.NOT_MEMBER, "worker 'b' left the job in membership epoch 2"),
        Release(("pa3",)),
    ]
    assert p.parked() == {"pc5": ("c", 5)}


def test_ssp_joiners_take_the_given_start_or_the_slowest_remaining_clock():
    p = SSP(1)
    p.on_membership(1, {"a": 4, "b": 6})
    p.on_membership(2, {"a": -1, "b": -1, "c": -1, "d": 2})
    assert p.clocks == {"a": 4, "b": 6, "c": 4, "d": 2}
    # Nobody stays: newcomers start where the slowest of the old set was.
    p.on_membership(3, {"e": -1})
    assert p.clocks == {"e": 2}
    fresh = SSP(1)
    fresh.on_membership(1, {"x": -1})
    assert fresh.clocks == {"x": 0}


def test_ssp_joiner_behind_the_bound_parks_nobody_already_answered():
    p = SSP(0)
    p.on_membership(1, {"a": 2})
    assert p.on_pull("a", 2, "pa2") == [Answer("pa2")]
    assert p.on_membership(2, {"a": -1, "b": 0}) == []
    assert p.on_pull("a", 2, "again") == [Park("again")]          # b is now 2 behind


# --- common ---------------------------------------------------------------------

@pytest.mark.parametrize("policy", [ASP(), BSP(), SSP(0)], ids=lambda p: p.name)
def test_plain_reads_are_answered_from_anyone_and_change_nothing(policy):
    policy.on_membership(1, {"a": -1})
    before = policy.state()
    assert policy.on_pull("stranger", -1, "r") == [Answer("r")]
    assert policy.on_pull("a", -1, "r2") == [Answer("r2")]
    assert policy.state() == before


@pytest.mark.parametrize("make", [ASP, BSP, lambda: SSP(1)], ids=["asp", "bsp", "ssp"])
def test_epochs_only_grow(make):
    p = make()
    p.on_membership(2, {"a": 0, "b": 0})
    assert p.on_membership(2, {"a": 0}) == []
    assert p.on_membership(1, {}) == []
    assert p.epoch == 2 and set(p.clocks) == {"a", "b"}
    p.on_membership(5, {"a": 0})
    assert p.epoch == 5 and set(p.clocks) == {"a"}


def test_open_mode_enters_workers_at_their_first_clocked_message():
    p = SSP(3)
    assert p.on_pull("a", 2, "pa") == [Answer("pa")]
    assert p.on_push("b", 4, "xb") == [Apply("xb", 0)]
    assert p.clocks == {"a": 2, "b": 5}
    assert p.state()["open"] is True
    # The first membership ends open mode: unlisted workers are refused.
    p.on_membership(1, {"a": -1})
    assert p.clocks == {"a": 2} and p.state()["open"] is False
    refused(p.on_push("b", 5, "xb5"), ErrorCode.NOT_MEMBER)


def test_forget_drops_a_parked_pull_silently():
    p = BSP()
    p.on_membership(1, {"a": -1})
    p.on_pull("a", 1, "gone")
    p.on_pull("a", 1, "kept")
    p.forget("gone")
    p.forget("never-parked")
    assert p.on_push("a", 0, "x") == [Accumulate("x", 0), ApplyMean(0, 1), Release(("kept",))]


@pytest.mark.parametrize("make", [ASP, BSP, lambda: SSP(2)], ids=["asp", "bsp", "ssp"])
def test_state_round_trip(make):
    p = make()
    p.on_membership(3, {"a": -1, "b": -1})
    p.on_push("a", 0, "xa0")
    p.on_pull("a", 9, "parked-or-not")
    st = p.state()
    wire = msgpack.unpackb(msgpack.packb(st), strict_map_key=False)
    for q in (Policy.from_state(wire), type(p).from_state(wire)):
        assert type(q) is type(p)
        assert q.state() == st
        assert q.parked() == {}                                  # parked pulls are not restored
    # The restored policy behaves as the original from here on.
    q = Policy.from_state(wire)
    p.forget("parked-or-not")
    assert q.on_push("b", 0, "xb0") == p.on_push("b", 0, "xb0")
    assert q.state() == p.state()


def test_from_state_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="policy state.name: expected one of asp, bsp, ssp, found 'xsp'"):
        Policy.from_state({"name": "xsp"})
    with pytest.raises(ValueError, match="expected one of ssp, found 'bsp'"):
        SSP.from_state(BSP().state())
    with pytest.raises(ValueError, match="cannot read"):
        Policy.from_state({"name": "asp", "version": 0})


def test_make_policy():
    assert isinstance(make_policy({}), ASP)
    assert isinstance(make_policy(None), ASP)
    assert isinstance(make_policy({"policy": "bsp", "staleness": 5}), BSP)
    assert make_policy({"policy": "bsp", "staleness": 5}).staleness == 0
    ssp = make_policy({"policy": "ssp"})
    assert isinstance(ssp, SSP) and ssp.staleness == 3
    assert make_policy({"policy": "ssp", "staleness": 0}).staleness == 0
    assert [p.name for p in (ASP(), BSP(), SSP())] == ["asp", "bsp", "ssp"]


@pytest.mark.parametrize("spec,message", [
    ({"policy": "async"}, "consistency.policy: expected one of asp, bsp, ssp, found 'async'"),
    ({"policy": "ssp", "staleness": -1},
     "consistency.staleness: expected an integer from 0 to 1000000, found -1"),
    ({"staleness": 1.5}, "consistency.staleness: expected an integer from 0 to 1000000, found 1.5"),
    ({"staleness": True}, "consistency.staleness: expected an integer from 0 to 1000000, found True"),
    ({"staleness": 10**7}, "consistency.staleness: expected an integer from 0 to 1000000, found 10000000"),
    ({"bound": 2}, "consistency.bound: unknown field (known fields here: policy, staleness)"),
    ("ssp", "consistency: expected a mapping of fields, found 'ssp'"),
])
def test_make_policy_bad_spec(spec, message):
    with pytest.raises(SpecError) as info:     # a ValueError: the shard answers bad_spec
        make_policy(spec)
    assert str(info.value) == message
    assert info.value.path == message.split(":")[0]


def test_make_policy_takes_the_job_files_consistency_section():
    assert make_policy({"policy": "ssp"}).staleness == normalize_section("consistency", {})["staleness"]
    assert make_policy({"policy": "ssp", "staleness": 2.0}).staleness == 2     # 2.0 reads as 2, as in a job file
    assert tuple(POLICIES) == JOB_POLICIES
    for name in JOB_POLICIES:
        assert make_policy({"policy": name}).name == name
