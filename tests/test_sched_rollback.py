"""Coordinated checkpoints and rollback in the scheduler's state machine (ps/sched/checkpoints.py),
event by event: a checkpoint exists once every shard lists it; a shard that restarted from its
checkpoint rolls the whole job back to the newest complete one; a refused restore falls back to an
older one; failures while rolling back are not the partitions' failures."""
from __future__ import annotations

from protocol.messages import Error, Heartbeat, Membership, Ok, Register, Restore
from ps.sched.events import ShardAnswer
from ps.sched.jobs import QUEUED
from tests.sched_driver import SHARDS, Driver, assignment, parts, spec, two_holders


def register_shard(d: Driver, k: int, instance: str, restored: dict | None = None):
    info = {"instance": instance}
    if restored is not None:
        info["restored"] = restored
    return d.ask(f"server{k}", Register(role="server", addr=SHARDS[k], shard=k, info=info))


def shard_beat(d: Driver, k: int, checkpoints: dict) -> None:
    reply = d.ask(f"server{k}", Heartbeat(role="server", state={"shard": k, "addr": SHARDS[k],
                                                                  "checkpoints": checkpoints}))
    assert isinstance(reply, Ok), reply


def started(d: Driver, **over) -> str:
    """Two shards (instances a0, a1) and a two-partition BSP job held by w1 and w2, at step 25 of 50,
    with checkpoints at versions 10 and 20 complete on both shards."""
    for k in range(2):
        register_shard(d, k, f"a{k}")
    job = two_holders(d, spec(steps=50, checkpoint_every=10, **over))
    d.heartbeat("w1", job, parts=parts(p0=(0, 25)))
    d.heartbeat("w2", job, parts=parts(p1=(0, 25)))
    for k in range(2):
        shard_beat(d, k, {job: [10, 20]})
    assert [c["version"] for c in d.m.runs[job].checkpoints] == [10, 20]
    return job


def restores(d: Driver) -> list:
    return [c for c in d.pending if isinstance(c.msg, Restore)]


def answer_restores(d: Driver, reply_for) -> list:
    out = []
    for call in restores(d):
        d.pending.remove(call)
        out += d.handle(ShardAnswer(call.call, reply_for(call), d.now))
    return out


def test_a_checkpoint_exists_once_every_shard_lists_it():
    d = Driver()
    for k in range(2):
        register_shard(d, k, f"a{k}")
    job = two_holders(d, spec(steps=50, checkpoint_every=10))
    run = d.m.runs[job]
    shard_beat(d, 0, {job: [10, 20]})
    assert run.checkpoints == []                        # shard 1 has none yet
    shard_beat(d, 1, {job: [10]})
    assert [c["version"] for c in run.checkpoints] == [10]
    shard_beat(d, 1, {job: [10, 20], "other-job": [5]})
    assert [c["version"] for c in run.checkpoints] == [10, 20]
    shard_beat(d, 0, {job: "garbage"})                  # malformed: nothing is complete from it, nothing raised
    assert [c["version"] for c in run.checkpoints] == [10, 20]
    assert d.status(job)["checkpoints"][-1]["version"] == 20


def test_a_restarted_shard_rolls_the_whole_job_back_to_the_newest_complete_checkpoint():
    d = Driver()
    job = started(d)
    run = d.m.runs[job]
    d.pending.clear()
    out = register_shard(d, 1, "b1", restored={job: 20})    # a new process, its table from version 20
    assert isinstance(out, Ok)
    assert run.rollback is not None and all(p.holder is None for p in run.partitions)
    # per shard: first the membership without holders, then the restore
    for addr in SHARDS:
        calls = [c.msg for c in d.pending if c.addr == addr]
        kinds = [type(m) for m in calls]
        assert Membership in kinds and Restore in kinds and kinds.index(Membership) < kinds.index(Restore)
        member = next(m for m in calls if isinstance(m, Membership))
        assert set(member.holders.values()) == {""}
        assert next(m for m in calls if isinstance(m, Restore)).version == 20
    # the holders are told to stop, and nothing is handed out while the shards restore
    assert d.heartbeat("w1", job).body["stop"] is True
    d.assign("w1")
    d.assign("w2")
    assert not any(run.held_by(w) for w in ("w1", "w2"))
    # a worker's failure meanwhile is the rollback's, not its partition's
    d.report("w2", job, "failed", error="ShardError: refused")
    assert all(p.failures == 0 for p in run.partitions) and not run.error

    d.ack()   # the memberships
    answer_restores(d, lambda c: Ok(rid=c.call, job=job, body={"job": job, "version": 20,
                                                               "clocks": {"p0": 20, "p1": 20}}))
    assert run.rollback is None
    assert [p.done_steps for p in run.partitions] == [20, 20]
    assert all(s.last <= 20 for p in run.partitions for s in p.segments)
    assert run.rollbacks[-1]["version"] == 20 and run.rollbacks[-1]["steps_lost"] == 10
    assert "rolled_back" in d.events(job)
    # handed out again: the workers that ask get the partitions, starting where the shards are
    d.assign("w1")
    d.assign("w2")
    d.ack()
    assert sorted(k for w in ("w1", "w2") for k in run.held_by(w)) == [0, 1]
    body = d.status(job)
    assert body["rollbacks"][0]["steps_lost"] == 10 and body["progress"]["steps_done"] == 40


def test_a_refused_restore_falls_back_to_the_older_complete_checkpoint():
    d = Driver()
    job = started(d)
    run = d.m.runs[job]
    d.pending.clear()
    register_shard(d, 0, "b0", restored={job: 20})
    answer_restores(d, lambda c: Error(rid=c.call, code="bad_state", message="checksum of value.0 differs")
                    if c.addr == SHARDS[0] else Ok(rid=c.call, body={"version": 20}))
    assert run.rollback is not None and run.rollback["version"] == 10
    assert {c.msg.version for c in restores(d)} == {10}
    answer_restores(d, lambda c: Ok(rid=c.call, body={"version": 10, "clocks": {"p0": 10, "p1": 10}}))
    assert run.rollback is None and [p.done_steps for p in run.partitions] == [10, 10]
    assert "restore_refused" in d.events(job)


def test_without_a_complete_checkpoint_to_go_back_to_the_job_fails_and_says_why():
    d = Driver()
    for k in range(2):
        register_shard(d, k, f"a{k}")
    job = two_holders(d, spec(steps=50, checkpoint_every=10))
    shard_beat(d, 0, {job: [10]})                       # shard 1 never wrote one
    register_shard(d, 0, "b0", restored={job: 10})
    record = d.m.jobs[job]
    assert "no complete checkpoint" in (d.m.runs[job].error if job in d.m.runs else record.error)


def test_every_restore_refused_fails_the_job():
    d = Driver()
    job = started(d)
    register_shard(d, 1, "b1", restored={job: 20})
    for _ in range(2):
        answer_restores(d, lambda c: Error(rid=c.call, code="bad_state", message="bad file"))
    record = d.m.jobs[job]
    assert record.state == "failed" and "could be restored" in record.error


def test_the_same_process_registering_again_is_not_a_restart():
    """After a scheduler restart every shard registers again: same instance, no rollback, even though
    its registration still says what it restored when it started."""
    d = Driver()
    job = started(d)
    register_shard(d, 1, "a1", restored={job: 20})
    run = d.m.runs[job]
    assert run.rollback is None and not run.rollbacks and run.held_by("w1") == [0]


def test_a_job_without_checkpoints_is_not_rolled_back():
    d = Driver()
    for k in range(2):
        register_shard(d, k, f"a{k}")
    job = two_holders(d, spec(steps=50))
    register_shard(d, 1, "b1")                          # restarted, restored nothing: nothing to roll back
    run = d.m.runs[job]
    assert run.rollback is None and not run.error


def test_rollbacks_survive_a_scheduler_restart():
    d = Driver()
    job = started(d)
    register_shard(d, 1, "b1", restored={job: 20})
    answer_restores(d, lambda c: Ok(rid=c.call, body={"clocks": {"p0": 20, "p1": 20}}))
    saved = d.m.runs[job].progress_record(d.now)
    record = d.m.jobs[job]
    record.progress, record.state = saved, QUEUED   # as the job store gives a running job back (ps/registry.py)
    again = Driver(records=[record])
    for k in range(2):
        register_shard(again, k, "a0" if k == 0 else "b1")
    again.register("w9")
    again.assign("w9")
    run = again.m.runs[job]
    assert run.rollbacks[0]["steps_lost"] == 10 and run.instances == {0: "a0", 1: "b1"}
    assert [c["version"] for c in run.checkpoints] == [10, 20]
    assert assignment(again.ack(), "w9").job == job
