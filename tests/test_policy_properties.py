"""Consistency policies under random interleavings (hypothesis).

A small simulator plays well-behaved workers against one policy: each
worker pulls at its clock, pushes that clock once the pull is answered, and
stops at a final clock. Workers join and leave through memberships with
growing epochs; a worker that left keeps sending (a zombie) and must be
refused. After EVERY event the simulator checks the policies' invariants
(README.md, "Semantics"); at the end it lets every worker run until none can move and
checks that nothing is parked and every live worker reached the end.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import ErrorCode
from ps.policy import ASP, BSP, SSP, Accumulate, Answer, Apply, ApplyMean, Park, Refuse, Release, make_policy

MAX_WORKERS = 6
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
POLICY_SPECS = {
    "asp": {"policy": "asp"},
    "bsp": {"policy": "bsp"},
    "ssp0": {"policy": "ssp", "staleness": 0},
    "ssp1": {"policy": "ssp", "staleness": 1},
    "ssp2": {"policy": "ssp", "staleness": 2},
}


@dataclass
class Worker:
    clock: int = 0           # steps completed, as the worker believes
    phase: str = "idle"      # idle: will pull; waiting: pull parked; ready: will push
    token: object = None     # its outstanding pull


class Sim:
    """Drives one policy with well-behaved workers and checks it after each event."""

    def __init__(self, policy, final: int, open_mode: bool, initial: dict[int, int]):
        self.p = policy
        self.final = final
        self.workers = {f"w{i}": Worker() for i in range(MAX_WORKERS)}
        self.live: set[str] = set()
        self.epoch = 0
        self.counter = 0
        self.pulls: dict[object, tuple[str, int]] = {}   # every clocked pull token -> (worker, clock)
        self.parked: dict[object, tuple[str, int]] = {}  # what the policy said it parked
        self.pending = 0                                 # BSP: accumulates in the open step
        self.desynced: set[str] = set()                  # BSP open mode: table clock != worker's
        if open_mode:
            self.live = {f"w{i}" for i in initial}
        else:
            self.membership({f"w{i}": start for i, start in initial.items()})

    # --- what workers do ---

    def token(self, kind: str) -> str:
        self.counter += 1
        return f"{kind}{self.counter}"

    def can_move(self, name: str) -> bool:
        w = self.workers[name]
        return (w.phase == "idle" and w.clock < self.final) or w.phase == "ready"

    def move(self, name: str) -> None:
        """The worker's next natural request: pull at its clock, or push it."""
        w = self.workers[name]
        if self.p.epoch == 0:
            self.live.add(name)              # open mode: whoever speaks takes part
        if w.phase == "idle" and w.clock < self.final:
            tok = self.token("pull")
            self.pulls[tok] = (name, w.clock)
            w.token = tok
            self.event(lambda: self.p.on_pull(name, w.clock, tok), actor=name, request=tok)
        elif w.phase == "ready":
            tok = self.token("push")
            self.event(lambda: self.p.on_push(name, w.clock, tok), actor=name, request=tok)

    def read(self, name: str) -> None:
        tok = self.token("read")
        before = self.p.state()
        assert self.p.on_pull(name, -1, tok) == [Answer(tok)]
        assert self.p.state() == before

    def forget(self, name: str) -> None:
        """The shard gives up on this worker's parked pull; the worker re-pulls later."""
        w = self.workers[name]
        if w.phase == "waiting":
            self.p.forget(w.token)
            del self.parked[w.token]
            w.phase = "idle"
            self.check()

    def membership(self, workers: dict[str, int]) -> None:
        self.epoch += 1 if self.counter % 3 else 2       # epochs grow, not always by one
        joining = set(workers) - set(self.p.clocks)

        def after():
            self.live = set(workers)
            for name in joining:             # a new worker process starts at the table's clock
                self.workers[name] = Worker(clock=self.p.clocks[name])
                self.desynced.discard(name)

        self.event(lambda: self.p.on_membership(self.epoch, workers), actor=None, request=None, after=after)

    def join(self, name: str, start: int) -> None:
        self.membership({**{n: -1 for n in sorted(self.live)}, name: start})

    def leave(self, name: str) -> None:
        self.membership({n: -1 for n in sorted(self.live) if n != name})

    def stale_membership(self, back: int, members: set[str]) -> None:
        before = self.p.state()
        assert self.p.on_membership(self.epoch - back, {n: 0 for n in members}) == []
        assert self.p.state() == before

    # --- one event and its checks ---

    def event(self, call, *, actor: str | None, request: object, after=None) -> None:
        p = self.p
        before = p.state()
        version = p.version
        actions = call()
        self.check_order(actions)
        answered: list[object] = []
        for a in actions:
            if isinstance(a, Refuse):
                self.on_refuse(a, actor, request, before)
            elif isinstance(a, Apply):
                assert a.push == request and not isinstance(p, BSP)
                self.pushed(actor)
            elif isinstance(a, Accumulate):
                assert a.push == request and isinstance(p, BSP)
                assert a.step == version, "BSP accumulates only into the open step"
                self.pending += 1
                self.pushed(actor)
            elif isinstance(a, ApplyMean):
                assert isinstance(p, BSP)
                assert a.step == version and a.count == self.pending > 0
                self.pending = 0
                version += 1
            elif isinstance(a, Answer):
                assert a.pull == request
                answered.append(a.pull)
            elif isinstance(a, Park):
                assert a.pull == request and not isinstance(p, ASP), "ASP never parks"
                self.parked[a.pull] = self.pulls[a.pull]
                self.workers[actor].phase = "waiting"
            elif isinstance(a, Release):
                assert a.pulls and list(a.pulls) == [t for t in self.parked if t in a.pulls], \
                    "released pulls come out in arrival order"
                for tok in a.pulls:
                    del self.parked[tok]
                answered.extend(a.pulls)
            else:
                pytest.fail(f"unknown action {a!r}")
        # Versions count updates: one per Apply (ASP/SSP), one per ApplyMean (BSP).
        applies = sum(isinstance(a, (Apply, ApplyMean)) for a in actions)
        assert p.version == before["version"] + applies
        if isinstance(p, BSP):
            assert p.version == version
        for tok in answered:
            name, clock = self.pulls[tok]
            self.check_answer(name, clock)
            self.workers[name].phase = "ready"
        if actor is not None and actor in p.clocks and p.clocks[actor] != self.workers[actor].clock:
            # Only BSP open mode moves a worker to the open step behind its back.
            assert isinstance(p, BSP) and p.epoch == 0 and before["clocks"].get(actor) is None
            self.desynced.add(actor)
        if after is not None:
            after()
        self.check()

    def check_order(self, actions: list) -> None:
        """The event's own action first, then ApplyMean, then Release."""
        rank = [2 if isinstance(a, Release) else 1 if isinstance(a, ApplyMean) else 0 for a in actions]
        assert rank == sorted(rank) and rank.count(1) <= 1 and rank.count(2) <= 1, actions

    def check_answer(self, name: str, clock: int) -> None:
        p = self.p
        assert name in p.clocks, "only live workers get clocked pulls answered"
        if isinstance(p, SSP):   # (1) the staleness bound holds when the pull is answered
            assert p.min_clock() >= clock - p.staleness, (name, clock, p.clocks)
        if isinstance(p, BSP):   # (4) a pull at clock c needs version >= c
            assert p.version >= clock

    def on_refuse(self, a: Refuse, actor, request, before: dict) -> None:
        p = self.p
        if request is None:      # a membership: parked pulls of workers that left
            assert a.code is ErrorCode.NOT_MEMBER
            name, _ = self.parked.pop(a.request)
            assert name not in p.clocks
            self.workers[name].phase = "idle"
            return
        assert a.request == request
        assert p.state() == before, "a refused request changes nothing"
        w = self.workers[actor]
        if a.code is ErrorCode.NOT_MEMBER:
            assert actor not in self.live and p.epoch > 0
            w.phase = "idle"
        else:                    # a worker the table moved: it resyncs from the error
            assert a.code is ErrorCode.BAD_CLOCK and actor in self.desynced, a
            self.desynced.discard(actor)
            self.workers[actor] = Worker(clock=p.clocks[actor])

    def pushed(self, name: str) -> None:
        w = self.workers[name]
        w.clock += 1
        w.phase = "idle"
        assert self.p.clocks[name] == w.clock

    def check(self) -> None:
        """Invariants that hold between events."""
        p = self.p
        if p.epoch > 0:
            assert set(p.clocks) == self.live
        for name in p.clocks:
            if name not in self.desynced:
                assert p.clocks[name] == self.workers[name].clock, (name, p.clocks)
        # (2) the parked set is exactly what was parked and not yet let go,
        # and holds only pulls whose condition fails.
        assert p.parked() == self.parked
        for name, clock in self.parked.values():
            assert name in p.clocks
            if isinstance(p, SSP):
                assert p.min_clock() < clock - p.staleness
            elif isinstance(p, BSP):
                assert p.version < clock
            else:
                pytest.fail("ASP never parks")          # (5)
        if isinstance(p, BSP):
            assert p.pending == self.pending
            assert all(c in (p.version, p.version + 1) for c in p.clocks.values()), p.clocks
            # (4) a barrier every live worker has pushed (or that nobody is
            # left to push) has been applied: acknowledged pushes never wait.
            assert not (p.pending and all(c > p.version for c in p.clocks.values())), (p.pending, p.clocks)

    # --- the end ---

    def run_to_end(self, pick=None) -> None:
        """Let live workers move (in `pick`'s order, else round-robin) until
        none can, then check that nobody is stuck."""
        for _ in range(20 * MAX_WORKERS * (self.final + 2)):
            movable = sorted(n for n in self.live if self.can_move(n))
            if not movable:
                break
            self.move(movable[pick(len(movable)) if pick else 0])
        else:
            raise AssertionError("workers never stopped moving")
        # (3) and liveness: nothing parked, every live worker at the end.
        assert self.p.parked() == {}
        for name in self.live:
            assert self.workers[name].clock == self.final, (name, self.p.clocks)
            assert self.p.clocks.get(name, self.final) == self.final


OPS = ["move"] * 8 + ["stranger", "join", "join", "leave", "leave_slowest", "leave_all", "read", "stale",
                      "forget"]
events_st = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, MAX_WORKERS - 1), st.integers(-1, 4)),
                     min_size=10, max_size=80)
initial_st = st.dictionaries(st.integers(0, MAX_WORKERS - 1), st.integers(-1, 2), min_size=1,
                             max_size=MAX_WORKERS)


def play(kind: str, final: int, open_mode: bool, initial: dict, events: list, pick=None) -> Sim:
    initial = {i: min(start, final) for i, start in initial.items()}
    sim = Sim(make_policy(POLICY_SPECS[kind]), final, open_mode, initial)
    everyone = sorted(sim.workers)
    for op, i, arg in events:
        # `i` picks among the workers the op makes sense for, so every event counts.
        if op == "move":
            pool = [n for n in everyone if n in sim.live and sim.can_move(n)]
        elif op == "stranger":                                     # zombies and strangers
            pool = [n for n in everyone if n not in sim.live and sim.can_move(n)]
        elif op == "join":
            pool = [n for n in everyone if n not in sim.live or sim.epoch == 0]
        elif op == "leave":
            pool = sorted(sim.live)
        elif op == "leave_slowest":          # the case that must unblock the others
            pool = sorted(sim.live, key=lambda n: (sim.p.clocks.get(n, 0), n))[:1]
        elif op == "leave_all":              # the scheduler loses every worker at once
            pool = sorted(sim.live)[:1]
        elif op == "read":
            pool = everyone
        elif op == "forget":
            pool = [n for n in everyone if sim.workers[n].phase == "waiting"]
        else:
            pool = everyone
        if not pool:
            continue
        name = pool[i % len(pool)]
        if op in ("move", "stranger"):
            sim.move(name)
        elif op == "join":
            sim.join(name, min(arg, final))
        elif op in ("leave", "leave_slowest"):
            sim.leave(name)
        elif op == "leave_all":
            sim.membership({})
        elif op == "read":
            sim.read(name)
        elif op == "stale":
            sim.stale_membership(max(0, arg), set(everyone[:i + 1]))
        else:
            sim.forget(name)
    sim.run_to_end(pick)
    return sim


def make_test(kind: str):
    @SETTINGS
    @given(final=st.integers(1, 5), open_mode=st.booleans(), initial=initial_st, events=events_st)
    def test(final, open_mode, initial, events):
        play(kind, final, open_mode, initial, events)

    test.__name__ = f"test_random_interleavings_keep_the_invariants_{kind}"
    return test


for _kind in POLICY_SPECS:
    globals()[f"test_random_interleavings_keep_the_invariants_{_kind}"] = make_test(_kind)


@SETTINGS
@given(kind=st.sampled_from(sorted(POLICY_SPECS)), final=st.integers(1, 5), data=st.data(),
       initial=st.dictionaries(st.integers(0, MAX_WORKERS - 1), st.integers(-1, 3), min_size=1))
def test_no_deadlock_in_any_scheduling_order(kind, final, data, initial):
    """Whichever worker the scheduler lets move next, everyone reaches the end."""
    def pick(n):
        return data.draw(st.integers(0, n - 1))
    sim = play(kind, final, False, initial, [], pick)
    assert set(sim.p.clocks) == {f"w{i}" for i in initial}


def test_simulator_catches_a_policy_that_ignores_the_bound():
    """The checks can fail: an SSP that answers every pull breaks (1)."""

    class Loose(SSP):
        def _horizon(self):
            return None

    sim = Sim(Loose(0), 3, False, {0: 0, 1: 0})
    sim.move("w0")
    sim.move("w0")
    try:
        sim.move("w0")        # pull at 1 while w1 is still at 0
    except AssertionError:
        return
    raise AssertionError("an answered pull beyond the bound went unnoticed")
