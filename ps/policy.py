"""Consistency policies (ASP, BSP, SSP) as pure state machines.

A shard keeps one Policy per job and feeds it events: a push, a pull, a new
membership. Each event returns the list of actions the shard performs, in
order: first the event's own action (Apply / Accumulate / Answer / Park /
Refuse), then a completed barrier (ApplyMean), then parked pulls that may now
go (Release). The policy holds no sockets, clocks or threads, so tests
compare action lists; `push` / `pull` tokens are opaque, hashable objects the shard
supplies and gets back in the actions.

Clocks: a worker's clock is the number of steps it has completed. A push for
step t carries clock t and moves the worker to clock t+1. A pull carries the
step the worker is about to compute; clock -1 is a plain read, answered at
once under every policy, from anyone.

Members: the clock table is keyed by member. In a job the scheduler runs,
the members are the job's data partitions ("p0", "p1", ...), and the
membership says which worker holds each one (`holders`): a worker pushes
one step of several partitions at once (`keys`), carrying the mean of
their gradients, and the push counts once per partition in a BSP barrier.
A partition stays a member while it has steps left, held or not, so a
barrier waits for a partition whose worker died until another worker
pushes its step: no partition ever skips one. A push for a step every one
of its partitions already completed here is a repeat (Duplicate): a
worker that took over a partition from one that died mid-push sends the
step again, and it is answered without being applied twice. Without
`keys` the pushing worker is its own member (tests, benchmarks, tools).

Membership: before the first membership (epoch 0, "open" mode) anyone may
push and pull, and a worker enters the clock table at its first clocked push
or pull. From the first membership on, only its workers are live; anyone
else is refused with NOT_MEMBER. A worker that joins takes the start clock
the membership gives it; with -1 (no start given) it takes, under BSP, the
open step (`version`), and under ASP/SSP the slowest clock among the workers
that stay, else the slowest clock the table had before this membership, else
0. Under BSP a joining worker always takes `version` (it joins the open
barrier, whatever start it was given), and so does a worker that enters the
table in open mode: any other clock could never push the open step and would
block the barrier for good.

Open mode under BSP counts only the workers the table has seen: a barrier
completes once every worker seen so far has pushed. A job with more than one
worker should send a membership before its first push.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from protocol.errors import ErrorCode
from protocol.jobspec import normalize_section

# --- actions -------------------------------------------------------------------

@dataclass(frozen=True)
class Apply:
    """ASP/SSP: apply this push's gradient now, on its own. `staleness`: how
    many updates landed since the version the gradient was computed from."""

    push: object
    staleness: int


@dataclass(frozen=True)
class Accumulate:
    """BSP: add this push's gradient, times `weight` (the partitions whose
    mean it is), into the sum of step `step`."""

    push: object
    step: int
    weight: int = 1


@dataclass(frozen=True)
class ApplyMean:
    """BSP: apply step `step`'s sum / `count` as ONE update; the version is
    now step + 1."""

    step: int
    count: int


@dataclass(frozen=True)
class Duplicate:
    """This push is a step every one of its partitions already completed
    here: answer it as done, apply nothing."""

    push: object


@dataclass(frozen=True)
class Answer:
    """Answer this pull now with the current parameters and version."""

    pull: object


@dataclass(frozen=True)
class Park:
    """Hold this pull; a later Release (or Refuse) names it again."""

    pull: object


@dataclass(frozen=True)
class Release:
    """Answer these parked pulls now, in this order (their arrival order)."""

    pulls: tuple


@dataclass(frozen=True)
class Refuse:
    """Answer `request` (a push or pull token) with an error; nothing was
    counted or changed."""

    request: object
    code: ErrorCode
    message: str


# --- policies ----------------------------------------------------------------

class Policy:
    """Clock table, version and parked pulls of one job; the base of ASP,
    BSP and SSP, which differ in how far ahead a pull may read (`_horizon`)
    and in what a push does."""

    name = ""

    def __init__(self, staleness: int = 0):
        self.staleness = staleness
        self.version = 0        # ASP/SSP: pushes applied; BSP: barriers completed
        self.epoch = 0          # latest membership epoch; 0 = open mode
        self.clocks: dict[str, int] = {}
        self.holders: dict[str, str] = {}   # partition key -> worker holding it ("" none)
        self._held: dict[str, frozenset] = {}  # worker -> the members it may push for
        self.pending = 0        # BSP: partitions' pushes accumulated into the open step
        self._parked: dict[object, tuple[str, int]] = {}  # token -> (worker, clock), arrival order

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(staleness={self.staleness}, version={self.version}, "
                f"epoch={self.epoch}, clocks={self.clocks}, parked={len(self._parked)})")

    # --- what the subclasses decide ---

    def _horizon(self) -> int | None:
        """The highest pull clock answerable now (None: any)."""
        return None

    def _entry_clock(self, clock: int) -> int:
        """Clock of a worker that enters the table in open mode with a
        clocked message carrying `clock`."""
        return clock

    def _start_clock(self, start: int, stay: Mapping[str, int], before: Mapping[str, int]) -> int:
        """Clock of a worker that joins through a membership with `start`."""
        if start >= 0:
            return start
        return min(stay.values(), default=min(before.values(), default=0))

    def _check_push(self, worker: str, keys: tuple, clock: int, push: object) -> Refuse | None:
        return None

    def _accept_push(self, keys: tuple, clock: int, push: object, base_version: int) -> list:
        """ASP/SSP: apply at once; a clocked push moves each member's clock to t+1."""
        staleness = max(0, self.version - base_version) if base_version >= 0 else 0
        self.version += 1
        if clock >= 0:
            for key in keys:
                self.clocks[key] = clock + 1
        return [Apply(push, staleness)]

    def _barrier(self) -> list:
        return []

    # --- events ---

    def on_push(self, worker: str, clock: int, push: object, *, base_version: int = -1,
                keys: tuple | list = ()) -> list:
        """A gradient for step `clock` (-1: unclocked) from `worker`, one step
        of each member in `keys` (empty: of `worker` itself)."""
        keys = tuple(keys) or (worker,)
        screened = self._screen(worker, clock, push, keys)
        if screened is not None:
            return [screened]
        return self._accept_push(keys, clock, push, base_version) + self._barrier() + self._release()

    def admit(self, worker: str, clock: int, piece: object, *, base_version: int = -1,
              keys: tuple | list = ()) -> Apply | Accumulate | Duplicate | Refuse:
        """An early piece of a push that comes in several messages (all but the
        last): what to do with its slices now, changing nothing. The step
        counts (clocks, barrier, version) at its last piece, `on_push`.

        The answer is the action the last piece will get if nothing changes
        in between: Apply (ASP/SSP, at the staleness of now), Accumulate
        (BSP), Duplicate or Refuse."""
        keys = tuple(keys) or (worker,)
        screened = self._screen(worker, clock, piece, keys)
        if screened is not None:
            return screened
        if self.name == "bsp":
            return Accumulate(piece, clock, len(keys))
        return Apply(piece, max(0, self.version - base_version) if base_version >= 0 else 0)

    def _screen(self, worker: str, clock: int, push: object, keys: tuple) -> Refuse | Duplicate | None:
        """The refusal or Duplicate a push gets before it is counted; None when it is accepted."""
        if len(set(keys)) != len(keys):
            return Refuse(push, ErrorCode.BAD_FIELD, "a push names one of its partitions twice")
        if self.epoch > 0:
            for key in keys:
                if key not in self.clocks or self.holders.get(key, key) != worker or not worker:
                    return self._not_member(push, worker, key)
        if clock < -1:
            return Refuse(push, ErrorCode.BAD_CLOCK, f"clock {clock} is not a step: expected -1 or a clock >= 0")
        if clock >= 0:
            behind = [k for k in keys if self.clocks.get(k) is not None and clock < self.clocks[k]]
            if behind and len(behind) == len(keys) and all(k in self.holders for k in keys):
                return Duplicate(push)
            if behind:
                key = behind[0]
                who = f"worker {worker!r}" if key == worker else f"partition {key!r}"
                return Refuse(push, ErrorCode.BAD_CLOCK,
                              f"{who} pushed step {clock} but has completed {self.clocks[key]} steps "
                              f"already: expected {self._expected(key)}")
        return self._check_push(worker, keys, clock, push)

    def on_pull(self, worker: str, clock: int, pull: object) -> list:
        """A request for the parameters to compute step `clock` (-1: a plain read)."""
        if clock == -1:
            return [Answer(pull)]
        if clock < -1:
            return [Refuse(pull, ErrorCode.BAD_CLOCK,
                           f"clock {clock} is not a step: expected -1 or a clock >= 0")]
        if self.epoch > 0:
            if worker not in self._held:
                return [self._not_member(pull, worker)]
        elif worker not in self.clocks:
            # Entering can only lower the slowest clock: nothing parked can go.
            self.clocks[worker] = self._entry_clock(clock)
        horizon = self._horizon()
        if horizon is None or clock <= horizon:
            return [Answer(pull)]
        behind = self._self_blocked(worker, clock)
        if behind is not None:
            return [behind(pull)]
        self._parked[pull] = (worker, clock)
        return [Park(pull)]

    def on_membership(self, epoch: int, workers: Mapping[str, int], holders: Mapping[str, str] | None = None) -> list:
        """The members of a new epoch, each with its start clock (-1: the
        policy's default), and who holds each partition member. An epoch not
        newer than the current one is ignored. Parked pulls of workers that
        hold nothing now are refused (NOT_MEMBER), and so are those of workers
        that were given a partition behind the step they wait for (REASSIGNED:
        the barrier would wait for a step only they can push now); barriers
        and parked pulls are re-evaluated against the new members at once."""
        if epoch <= self.epoch:
            return []
        before = self.clocks
        stay = {w: c for w, c in before.items() if w in workers}
        self.clocks = {w: stay[w] if w in stay else self._start_clock(int(start), stay, before)
                       for w, start in workers.items()}
        self._set_holders(holders or {})
        self.epoch = epoch
        actions: list = []
        for token, (worker, clock) in list(self._parked.items()):
            if worker not in self._held:
                del self._parked[token]
                actions.append(Refuse(token, ErrorCode.NOT_MEMBER,
                                      f"worker {worker!r} left the job in membership epoch {epoch}"))
                continue
            behind = self._self_blocked(worker, clock)
            if behind is not None:
                del self._parked[token]
                actions.append(behind(token))
        return actions + self._barrier() + self._release()

    def forget(self, pull: object) -> None:
        """Drop a parked pull the shard abandoned (its peer is gone)."""
        self._parked.pop(pull, None)

    # --- views ---

    def parked(self) -> dict:
        """token -> (worker, clock) of every parked pull, in arrival order."""
        return dict(self._parked)

    def min_clock(self) -> int | None:
        """The slowest live clock (None when no worker is live)."""
        return min(self.clocks.values(), default=None)

    def _set_holders(self, holders: Mapping[str, str]) -> None:
        """Who holds each member now (members absent from `holders` hold themselves)."""
        self.holders = {str(k): str(h) for k, h in holders.items() if k in self.clocks}
        held: dict[str, set] = {}
        for key in self.clocks:
            holder = self.holders.get(key, key)
            if holder:
                held.setdefault(holder, set()).add(key)
        self._held = {w: frozenset(ks) for w, ks in held.items()}

    def _self_blocked(self, worker: str, clock: int):
        """A refusal maker when a pull at `clock` would wait for a step only `worker` itself can push.

        A worker given a partition that is behind (its previous holder died
        before pushing the open step) must push that step first: holding
        its pull would wait on itself for good. It is told REASSIGNED, asks
        the scheduler which partitions it holds, and pushes the missing step.
        """
        keys = [k for k in self._held.get(worker, ()) if k in self.holders]
        late = [k for k in keys if self.clocks[k] < clock - self.staleness]
        if not late:
            return None
        key = min(late, key=lambda k: self.clocks[k])
        message = (f"worker {worker!r} holds {key!r}, which has completed {self.clocks[key]} steps: it must push "
                   f"step {self.clocks[key]} before it can read step {clock} (membership epoch {self.epoch}); "
                   "ask the scheduler for its partitions")
        return lambda token: Refuse(token, ErrorCode.REASSIGNED, message)

    def held_by(self, worker: str) -> frozenset:
        """The members `worker` may push for in the current epoch."""
        return self._held.get(worker, frozenset())

    def state(self) -> dict:
        """Everything but the parked pulls, msgpack-able, for checkpoints."""
        return {"name": self.name, "staleness": self.staleness, "version": self.version,
                "epoch": self.epoch, "clocks": dict(self.clocks), "holders": dict(self.holders),
                "open": self.epoch == 0, "pending": self.pending}

    @classmethod
    def from_state(cls, state: Mapping) -> Policy:
        """Rebuild a policy from `state()` (on Policy: of the kind it names;
        on a subclass: of that kind only). Parked pulls are not restored:
        their requesters retry. Raises ValueError on a state it cannot read."""
        kind = POLICIES.get(state.get("name"))
        if kind is None or (cls is not Policy and kind is not cls):
            expected = ", ".join(POLICIES) if cls is Policy else cls.name
            raise ValueError(f"policy state.name: expected one of {expected}, found {state.get('name')!r}")
        try:
            policy = kind(int(state["staleness"])) if kind is SSP else kind()
            policy.version = int(state["version"])
            policy.epoch = int(state["epoch"])
            policy.clocks = {str(w): int(c) for w, c in state["clocks"].items()}
            policy._set_holders(state.get("holders", {}))
            policy.pending = int(state.get("pending", 0))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"policy state: cannot read it ({type(exc).__name__}: {exc})") from None
        return policy

    # --- helpers ---

    def _release(self) -> list:
        if not self._parked:
            return []
        horizon = self._horizon()
        ready = tuple(t for t, (_, c) in self._parked.items() if horizon is None or c <= horizon)
        for token in ready:
            del self._parked[token]
        return [Release(ready)] if ready else []

    def _expected(self, key: str) -> str:
        known = self.clocks.get(key)
        return "a clock >= 0" if known is None else f"a clock >= {known}"

    def _not_member(self, request: object, worker: str, key: str | None = None) -> Refuse:
        if key is not None and key != worker:
            return Refuse(request, ErrorCode.NOT_MEMBER,
                          f"worker {worker!r} does not hold {key!r} in membership epoch {self.epoch}")
        return Refuse(request, ErrorCode.NOT_MEMBER,
                      f"worker {worker!r} is not a member of the job in membership epoch {self.epoch}")


class ASP(Policy):
    """Asynchronous: every push is applied at once, every pull answered at once."""

    name = "asp"

    def __init__(self, staleness: int = 0):
        super().__init__(0)


class SSP(Policy):
    """Bounded staleness s: pushes as in ASP; a pull at clock c is answered
    only while the slowest live clock is >= c - s, else parked."""

    name = "ssp"

    def __init__(self, staleness: int = 3):
        super().__init__(staleness)

    def _horizon(self) -> int | None:
        slowest = self.min_clock()
        return None if slowest is None else slowest + self.staleness

    def _check_push(self, worker: str, keys: tuple, clock: int, push: object) -> Refuse | None:
        if clock == -1:
            return Refuse(push, ErrorCode.BAD_CLOCK,
                          f"ssp needs the step of every push; worker {worker!r} sent clock -1: "
                          f"expected {self._expected(keys[0])}")
        return None


class BSP(Policy):
    """Synchronous: pushes for the open step `version` are summed; once every
    live worker has pushed it, one ApplyMean, and pulls up to the new version
    are released. A pull at clock c waits until version >= c."""

    name = "bsp"

    def __init__(self, staleness: int = 0):
        super().__init__(0)

    def _horizon(self) -> int | None:
        return self.version

    def _entry_clock(self, clock: int) -> int:
        return self.version

    def _start_clock(self, start: int, stay: Mapping[str, int], before: Mapping[str, int]) -> int:
        return self.version

    def _expected(self, key: str) -> str:
        if self.clocks.get(key, self.version) > self.version:
            return f"clock {self.version + 1} once step {self.version} completes"
        return f"clock {self.version}"

    def _check_push(self, worker: str, keys: tuple, clock: int, push: object) -> Refuse | None:
        if clock != self.version:
            return Refuse(push, ErrorCode.BAD_CLOCK,
                          f"bsp is at step {self.version}; worker {worker!r} pushed "
                          f"{'no step (clock -1)' if clock == -1 else f'step {clock}'}: "
                          f"expected {self._expected(keys[0])}")
        return None

    def _accept_push(self, keys: tuple, clock: int, push: object, base_version: int) -> list:
        # Past _check_push and the stale check, clock == version and each
        # member's own clock (if known) is version too.
        for key in keys:
            self.clocks[key] = clock + 1
        self.pending += len(keys)
        return [Accumulate(push, clock, len(keys))]

    def _barrier(self) -> list:
        # An empty live set with pushes pending applies them too: an
        # acknowledged push is never lost.
        if self.pending == 0 or any(c <= self.version for c in self.clocks.values()):
            return []
        action = ApplyMean(self.version, self.pending)
        self.version += 1
        self.pending = 0
        return [action]


POLICIES: dict[str, type[Policy]] = {"asp": ASP, "bsp": BSP, "ssp": SSP}


def make_policy(spec: Mapping | None) -> Policy:
    """Build the policy of a `consistency:` spec, normalized by
    protocol/jobspec.py (missing fields take the job file's defaults).
    Raises SpecError, a ValueError, with one sentence naming a bad field."""
    s = normalize_section("consistency", spec)
    return SSP(s["staleness"]) if s["policy"] == "ssp" else POLICIES[s["policy"]]()
