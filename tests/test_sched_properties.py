"""Property tests of the scheduler's state machine (ps/sched/state.py) in a simulated cluster.

Hypothesis draws sequences of arrivals, late joins, steps, deaths, freezes
and thaws, lost shard calls, time jumps, duplicate and stale reports,
failures, cancels and malformed requests (tests/sched_world.py carries them
out), and after every event checks what must always hold:

1. every partition of a succeeded job did exactly the steps it owes (the
   simulated shards' ledger, not the machine's own word);
2. no partition is held by two live workers;
3. a job's state only moves forward;
4. no event raises out of the machine, and none is answered `internal`.

Then the faults stop and the surviving and two fresh workers do their
part: every job must end (no livelock, no job stuck behind another).

The checks can fail: the same properties run against two broken machines
(one that counts a partition done a step early, one that hands a partition to
a joiner without its holder giving it back) and each is caught.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.messages import Assign, Heartbeat, Register, Report, Status, Submit
from ps.sched.state import SchedulerState
from tests.sched_world import World, job_spec, settle, work_round

WORKERS = 5
SETTLE_ROUNDS = 600

# Rounds (every worker does its part) outweigh faults, so faults land mid-job.
ROUND = st.tuples(st.just("round"), st.sampled_from([0.1, 0.3, 0.5]))
ACTIONS = st.one_of(
    ROUND, ROUND, ROUND, ROUND, ROUND, ROUND, ROUND, ROUND,
    st.tuples(st.just("submit"), st.integers(1, 3), st.integers(1, 12), st.sampled_from(["bsp", "asp", "ssp"]),
              st.booleans()),
    st.tuples(st.just("ask"), st.integers(0, WORKERS - 1)),
    st.tuples(st.just("step"), st.integers(0, WORKERS - 1)),
    st.tuples(st.just("step"), st.integers(0, WORKERS - 1)),
    st.tuples(st.just("heartbeat"), st.integers(0, WORKERS - 1)),
    st.tuples(st.just("die"), st.integers(0, WORKERS - 1)),
    st.tuples(st.just("freeze"), st.integers(0, WORKERS - 1)),
    st.tuples(st.just("freeze"), st.integers(0, WORKERS - 1)),
    st.tuples(st.just("thaw"), st.integers(0, WORKERS - 1)),
    st.tuples(st.just("tick"), st.sampled_from([0.1, 0.5, 1.0, 4.0])),
    st.tuples(st.just("tick"), st.just(4.0)),
    st.tuples(st.just("deliver"), st.integers(1, 6)),
    st.tuples(st.just("lose"), st.integers(1, 2)),
    st.tuples(st.just("duplicate"), st.integers(0, WORKERS - 1)),
    st.tuples(st.just("stale"), st.integers(0, WORKERS - 1), st.integers(0, 2),
              st.sampled_from(["done", "release", "failed", "eval", "final", "initialized"])),
    st.tuples(st.just("fail"), st.integers(0, WORKERS - 1), st.booleans()),
    st.tuples(st.just("cancel"), st.integers(0, 3)),
    st.tuples(st.just("garbage"), st.integers(0, 10**6)),
)


def garbage(world: World, seed: int) -> None:
    """A malformed or senseless request a confused or hostile peer could send."""
    rng = random.Random(seed)
    w = f"w{rng.randrange(WORKERS + 2)}"
    job = rng.choice(world.job_ids + ["nojob", ""])
    junk = rng.choice([None, -1, 2**70, "x", [1, "a"], {"a": {"b": []}}, 1.5, True, {}])
    msg = rng.choice([
        Report(worker=w, job=job, event=rng.choice(["plan", "done", "nonsense", ""]), state={"parts": junk}),
        Report(worker=w, job=job, event="plan", state={"tensors": junk, "train_size": junk}),
        Report(worker=w, job=job, event="release", state={"release": junk}),
        Report(worker=w, job=job, event="failed", state={"error": junk, "fatal": junk}),
        Report(worker=w, job=job, event="eval", state={"test_accuracy": junk}),
        Heartbeat(worker=w, job=job, role=rng.choice(["worker", "server", "x"]), state={"parts": junk, "shard": junk,
                                                                                         "jobs": junk}),
        Register(role=rng.choice(["server", "x"]), addr=rng.choice(["ipc://", "tcp://h:0", "x", ""]),
                 shard=rng.randrange(-3, 5000)),
        Assign(worker=w + "-unknown", wait_s=1.0),
        Submit(spec={"name": "bad", "workers": junk}),
        Status(job="nojob"),
    ])
    world.send(("junk",), msg)


def act(world: World, action: tuple) -> None:
    kind = action[0]
    if kind == "round":
        work_round(world, action[1])
    elif kind == "submit":
        _, parts, steps, policy, epochs = action
        name = f"j{len(world.job_ids)}"
        world.submit(job_spec(name, parts, None if epochs else steps, policy, epochs=steps if epochs else None))
    elif kind in ("ask", "step", "heartbeat"):
        w = world.worker(action[1])
        {"ask": world.ask, "step": world.step, "heartbeat": world.heartbeat}[kind](w)
    elif kind == "die":
        world.worker(action[1]).dead = True
    elif kind == "freeze":
        world.worker(action[1]).frozen = True
    elif kind == "thaw":
        world.worker(action[1]).frozen = False
    elif kind == "tick":
        world.tick(action[1])
    elif kind == "deliver":
        world.deliver(action[1])
    elif kind == "lose":
        world.deliver(action[1], lose=True)
    elif kind == "duplicate":
        w = world.worker(action[1])
        if w.last_report is not None and not w.dead:
            world.send(("rep", w.id), w.last_report)
    elif kind == "stale":
        _, index, part, event = action
        w = world.worker(index)
        job = world.job_ids[part % len(world.job_ids)] if world.job_ids else None
        # Stale: about a job the worker has no part in now (what it says about its own is not stale).
        if job is not None and not w.dead and (w.task is None or w.task.job != job):
            world.send(("rep", w.id), Report(worker=w.id, job=job, event=event,
                                             state={"parts": {str(part): {"from": 0, "step": 1}},
                                                    "release": [part], "error": "stale", "test_accuracy": 0.5}))
    elif kind == "fail":
        w = world.worker(action[1])
        if w.task is not None and not w.dead and not w.frozen:
            world.leave(w, "failed", {"error": "simulated failure", "fatal": action[2]})
    elif kind == "cancel":
        world.cancel(action[1])
    elif kind == "garbage":
        garbage(world, action[1])


def run_world(state_cls, actions: list) -> World:
    world = World(state_cls)
    for action in actions:
        act(world, action)
        world.check()
    for fresh in (WORKERS, WORKERS + 1):  # late joiners, so a cluster whose workers all died can finish
        world.register(world.worker(fresh))
    settle(world, SETTLE_ROUNDS)
    world.check()
    stuck = [(j, world.m.jobs[j].state) for j in world.job_ids if world.m.jobs[j].state not in
             ("succeeded", "failed", "cancelled")]
    assert not stuck, f"jobs did not end once the faults stopped: {stuck}"
    return world


PROPERTY = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY
@given(st.lists(ACTIONS, min_size=5, max_size=150))
def test_random_clusters_keep_the_invariants(actions):
    run_world(SchedulerState, actions)


def test_a_plain_cluster_runs_every_job_to_success():
    """Without faults: three jobs, four workers, every partition does exactly its steps."""
    actions = [("submit", 3, 3, "bsp", False), ("submit", 2, 4, "asp", False), ("submit", 1, 2, "ssp", True)]
    actions += [("ask", k) for k in range(4)]
    world = run_world(SchedulerState, actions)
    for job in world.job_ids:
        record = world.m.jobs[job]
        assert record.state == "succeeded", (job, record.error)
        owed = [p["steps"] for p in record.result["partitions"]]
        assert world.ledger[job] == dict(enumerate(owed))
        assert record.result["steps_done"] == sum(owed)
        assert record.result["examples"] == sum(owed) * 8


# --- the checks can fail: broken machines are caught -------------------------


class CountsOneStepShort(SchedulerState):
    """Broken: a partition one step short of what it owes counts as done."""

    def _training_moved(self, run, now):
        for p in run.partitions:
            if p.steps is not None and p.done_steps == p.steps - 1:
                p.done_steps = p.steps
        super()._training_moved(run, now)


class TakesWithoutRelease(SchedulerState):
    """Broken: a joiner is handed a partition straight from a live holder, which is never told."""

    def _ask_releases(self, run, active, load):
        joiners = [w for w in run.joining if load.get(w, 0) == 0]
        for joiner in joiners:
            busiest = max(run.holders(), key=lambda h: len(run.held_by(h)), default=None)
            if busiest is None or len(run.held_by(busiest)) < 2:
                return
            run.grant(joiner, [run.held_by(busiest)[-1]])


@pytest.mark.parametrize("broken, words", [
    (CountsOneStepShort, "succeeded but its partitions did"),
    (TakesWithoutRelease, "held by two live workers"),
])
def test_the_checks_catch_a_broken_machine(broken, words):
    @PROPERTY
    @given(st.lists(ACTIONS, min_size=5, max_size=150))
    def prop(actions):
        run_world(broken, actions)

    with pytest.raises(AssertionError, match=words):
        prop()
