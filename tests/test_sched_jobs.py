"""Event-by-event unit tests of the scheduler's state machine (ps/sched/state.py): progress
accounting and the figures of a result, cancel, target accuracy, status and list views, forged
server heartbeats, and a restarted scheduler picking up its jobs (tests/sched_driver.py drives it).
"""
from __future__ import annotations

import dataclasses

import pytest

from protocol.assignment import EVAL, TRAIN, Assignment
from protocol.messages import Cancel, Error, Evict, Heartbeat, List, Ok, Register, Report, Status
from ps.registry import JobStore
from ps.sched.events import Persist, Reply
from ps.sched.state import EPOCH_STRIDE
from tests import sched_driver as sd  # the driver and its helpers: sd.Driver, sd.spec, ...

# --- 7. progress accounting and the end of a job -------------------------------------------------------


def test_progress_done_final_evaluation_and_the_results_figures():
    d = sd.Driver(wall_offset=1000.0)
    job = d.submit(sd.spec(workers=2, steps=5))                   # batch 8
    d.now = 1.0
    d.register("w1")
    d.register("w2")
    d.assign("w1")
    d.ack()
    d.report("w1", job, "plan", tensors=sd.TENSORS, nonlearned=[], train_size=sd.TRAIN_SIZE)
    d.now = 2.0
    d.report("w1", job, "initialized")                         # training starts at t=2
    d.now = 3.0
    d.heartbeat("w1", job, parts=sd.parts(p0=(0, 2), p1=(0, 3)))
    assert [p["steps_done"] for p in d.status(job)["partitions"]] == [2, 3]
    d.heartbeat("w2", job, parts=sd.parts(p0=(0, 5), p1=(0, 5)))  # w2 holds nothing: nothing moves
    d.heartbeat("w1", job, parts=sd.parts(p0=(0, 1)))             # steps never go back
    assert [p["steps_done"] for p in d.status(job)["partitions"]] == [2, 3]

    d.now = 6.0
    out = d.send("w1/report", Report(worker="w1", job=job, event="done", state={"parts": sd.parts(p0=(0, 5))}))
    assert sd.reply_to(out, "w1/report").body["partitions"] == [1]
    assert [c.msg.holders for c in sd.memberships(out)] == [{"p1": "w1"}] * 2
    assert [c.msg.workers for c in sd.memberships(out)] == [{"p1": -1}] * 2
    d.ack()
    d.now = 7.0
    out = d.send("w1/report", Report(worker="w1", job=job, event="done", state={"parts": sd.parts(p1=(0, 5))}))
    assert sd.reply_to(out, "w1/report").body["stop"] is True
    assert [(c.msg.workers, c.msg.holders) for c in sd.memberships(out)] == [({}, {})] * 2
    d.ack()

    d.now = 8.0
    out = d.assign("w1")                                       # free again: the final evaluation
    assert not sd.replies(out, "w1/assign")                    # told once the shards let it read
    assert [m.msg.readers for m in sd.memberships(out)] == [["w1"], ["w1"]]
    a = sd.assignment(d.ack(), "w1")
    assert a.task == EVAL and a.partitions == [] and not a.init and a.steps == [5, 5]
    assert d.m.runs[job].eval_worker == "w1"
    d.now = 9.0
    out = d.send("w1/report", Report(worker="w1", job=job, event="final",
                                     state={"test_accuracy": 0.75, "test_loss": 0.5}))
    assert sd.reply_to(out, "w1/report").body["stop"] is True
    assert job not in d.m.runs
    record = d.m.jobs[job]
    assert record.state == "succeeded" and record.finished == 1009.0 and record.started == 1001.0
    res = record.result
    assert res["steps_done"] == res["steps_asked"] == 10
    assert res["examples"] == 5 * 8 * 2
    assert res["train_s"] == 5.0                               # initialized at 2, last step reported at 7
    assert res["examples_per_s"] == 80 / 5.0
    assert res["wall_s"] == 8.0                                # from the start at 1
    assert res["stopped_by"] == "steps" and res["test_accuracy"] == 0.75 and res["test_loss"] == 0.5
    assert [p["holders"] for p in res["partitions"]] == [[{"worker": "w1", "first": 0, "last": 5}]] * 2
    [ended] = [p for p in sd.persists(out, job) if "state" in p.fields]
    assert ended.fields["state"] == "succeeded" and ended.fields["result"] == res


def test_a_done_report_for_unfinished_partitions_ungrants_nothing():
    d = sd.Driver()
    job = sd.start(d, sd.spec())
    out = d.send("w1/report", Report(worker="w1", job=job, event="done", state={"parts": sd.parts(p0=(0, 4))}))
    assert sd.reply_to(out, "w1/report").body["partitions"] == [0, 1]
    assert sd.memberships(out) == []
    assert d.m.runs[job].held_by("w1") == [0, 1]


# --- 8. cancel -----------------------------------------------------------------------------------------


def test_cancelling_a_queued_job_ends_it_at_once_and_twice_is_bad_state():
    d = sd.Driver(shards=(), wall_offset=100.0)
    job = d.submit(sd.spec())
    d.now = 4.0
    out = d.send("user", Cancel(job=job))
    assert [type(i) for i in out] == [Persist, Reply]
    assert out[0].fields == {"state": "cancelled", "finished": 104.0}
    assert out[1].msg.body == {"job": job, "state": "cancelled"}
    assert d.m.jobs[job].state == "cancelled"
    sd.assert_error(d.ask("user", Cancel(job=job)), "bad_state", "already cancelled")
    sd.assert_error(d.ask("user", Cancel(job="nope-9")), "unknown_job")


def test_cancelling_a_running_job_freezes_it_and_it_ends_once_its_worker_stopped():
    d = sd.Driver()
    job = sd.start(d, sd.spec())
    out = d.send("user", Cancel(job=job))
    assert sd.reply_to(out, "user").body == {"job": job, "state": "cancelled"}
    assert [p.fields["state"] for p in sd.persists(out, job)] == ["cancelled"]
    assert [(c.addr, c.msg.workers, c.msg.holders) for c in sd.memberships(out)] == \
        [(sd.SHARDS[0], {}, {}), (sd.SHARDS[1], {}, {})]
    assert job in d.m.runs                                         # until its worker left
    sd.assert_error(d.ask("user", Cancel(job=job)), "bad_state", "already cancelled")
    assert d.heartbeat("w1", job).body["stop"] is True
    out = d.send("w1/report", Report(worker="w1", job=job, event="stopped"))
    assert sd.reply_to(out, "w1/report").body["stop"] is True
    assert job not in d.m.runs
    [ended] = sd.persists(out, job)
    assert "state" not in ended.fields and ended.fields["result"]["stopped_by"] == "cancel"
    assert d.m.jobs[job].state == "cancelled" and d.m.workers["w1"].job is None


# --- 9. target accuracy --------------------------------------------------------------------------------


def target_job(d: sd.Driver) -> str:
    job = sd.start(d, sd.spec(workers=1, steps=100, target_accuracy=0.9))
    d.heartbeat("w1", job, parts=sd.parts(p0=(0, 10)))
    out = d.send("w1/report", Report(worker="w1", job=job, event="eval",
                                     state={"step": 10, "test_accuracy": 0.95, "test_loss": 0.2}))
    assert sd.reply_to(out, "w1/report").body["stop"] is True
    assert [(c.msg.workers, c.msg.holders) for c in sd.memberships(out)] == [({}, {})] * 2
    run = d.m.runs[job]
    assert run.stopping and run.stopped_by == "target" and run.target_seen == 0.95
    d.ack()
    d.report("w1", job, "stopped")
    d.assign("w1")
    a = sd.assignment(d.ack(), "w1")                                  # it left: it evaluates
    assert a.task == EVAL and run.eval_worker == "w1"
    return job


def test_reaching_the_target_stops_training_and_a_final_at_target_succeeds():
    d = sd.Driver()
    job = target_job(d)
    d.report("w1", job, "final", test_accuracy=0.93, test_loss=0.25)
    assert job not in d.m.runs
    record = d.m.jobs[job]
    assert record.state == "succeeded"
    res = record.result
    assert res["stopped_by"] == "target" and res["target_accuracy_seen"] == 0.95
    assert res["test_accuracy"] == 0.93 and res["steps_done"] == 10 and res["steps_asked"] == 100


def test_a_final_below_the_target_resumes_training():
    d = sd.Driver()
    job = target_job(d)
    out = d.send("w1/report", Report(worker="w1", job=job, event="final", state={"test_accuracy": 0.8}))
    run = d.m.runs[job]
    assert not run.stopping and run.stopped_by == "" and run.final is None and run.eval_worker is None
    assert [(c.msg.workers, c.msg.holders) for c in sd.memberships(out)] == [({"p0": -1}, {"p0": ""})] * 2
    d.ack()
    out = d.assign("w1")
    assert sd.replies(out, "w1/assign") == []
    a = sd.assignment(d.ack(), "w1")
    assert a.task == TRAIN and a.partitions == [0] and not a.init
    assert d.status(job)["partitions"][0]["steps_done"] == 10


# --- 12. status and list views ---------------------------------------------------------------------------


def test_job_status_shows_each_partitions_steps_examples_and_holders():
    d = sd.Driver()
    job = sd.two_holders(d, sd.spec(steps=10))
    d.heartbeat("w1", job, parts={"0": {"from": 0, "step": 4, "loss": 0.5, "max_staleness": 2}})
    d.heartbeat("w2", job, parts={"1": {"from": 0, "step": 1, "loss": 1.5}})
    body = d.status(job)
    assert body["state"] == "running" and body["shards"] == list(sd.SHARDS)
    assert body["plan_digest"] == d.m.runs[job].plan.digest
    p0, p1 = body["partitions"]
    assert (p0["index"], p0["steps"], p0["steps_done"], p0["examples"], p0["holder"]) == (0, 10, 4, 32, "w1")
    assert p0["holders"] == [{"worker": "w1", "first": 0, "last": 4}]
    assert p0["loss"] == 0.5 and p0["max_staleness"] == 2
    assert (p1["steps_done"], p1["examples"], p1["holder"]) == (1, 8, "w2")
    # w1 held partition 1 first (it initialised the job) and gave it back before training it.
    assert p1["holders"] == [{"worker": "w1", "first": 0, "last": 0}, {"worker": "w2", "first": 0, "last": 1}]
    progress = body["progress"]
    assert progress["steps_done"] == 5 and progress["steps_asked"] == 20 and progress["examples"] == 40
    assert progress["loss"] == 1.0 and progress["workers"] == 2 and progress["slowest"]["partition"] == 1
    # A worker of the job claiming a partition it does not hold moves nothing.
    d.heartbeat("w2", job, parts=sd.parts(p0=(0, 9)))
    assert d.status(job)["partitions"][0]["steps_done"] == 4


def test_status_of_a_queued_job_and_of_an_unknown_one():
    d = sd.Driver(shards=())
    job = d.submit(sd.spec())
    body = d.status(job)
    assert body["state"] == "queued" and body["partitions"] == [] and body["progress"] == {}
    assert body["plan_digest"] is None and body["shard_stats"] == []
    sd.assert_error(d.ask("user", Status(job="nope-1")), "unknown_job", "nope-1")


def test_list_is_newest_first():
    d = sd.Driver(shards=())
    ids = [d.submit(sd.spec(name=n)) for n in ("a", "b", "c")]
    d.send("user", Cancel(job=ids[1]))
    jobs = d.ask("user", List()).body["jobs"]
    assert [(j["id"], j["state"]) for j in jobs] == [("c-3", "queued"), ("b-2", "cancelled"), ("a-1", "queued")]


def test_cluster_status_cannot_be_forged_through_info():
    d = sd.Driver()
    d.register("w1", worker="evil", job="forged-1", partitions=[7], host="h1")
    job = sd.start(d, sd.spec(), w="w2")
    body = d.status()
    assert [s["addr"] for s in body["servers"]] == list(sd.SHARDS)
    w1, w2 = body["workers"]
    assert (w1["worker"], w1["job"], w1["partitions"], w1["host"]) == ("w1", None, [], "h1")
    assert (w2["worker"], w2["job"], w2["partitions"]) == ("w2", job, [0, 1])
    assert body["running"] == [job] and body["queued"] == []


# --- 13. forged server heartbeats -----------------------------------------------------------------------


def test_forged_server_heartbeats_are_answered_and_do_not_break_status():
    d = sd.Driver()
    job = sd.start(d, sd.spec())
    assert d.ask("s", Heartbeat(role="server", state={"shard": "0"})).body == {"reregister": True}
    assert d.ask("s", Heartbeat(role="server", state={"shard": True})).body == {"reregister": True}
    assert d.ask("s", Heartbeat(role="server", state={"shard": 0, "addr": sd.SHARDS[0], "jobs": [job]})).body == {}
    assert d.status(job)["shard_stats"] == []
    forged = {job: {"version": "v", "epoch": 3, "clocks": {"p0": "x", "p1": 4, "p2": -1}, "policy": 7,
                    "staleness_hist": {"1": 2, "x": 3, "2": "y"}},
              "other": [1, 2], 5: {"version": 1}}
    assert d.ask("s", Heartbeat(role="server", state={"shard": 1, "addr": sd.SHARDS[1], "jobs": forged})).body == {}
    # The beats of another server under a registered id keep nothing alive: it is told to register.
    assert d.ask("s", Heartbeat(role="server", state={"shard": 1, "addr": "tcp://127.0.0.9:1"})).body == \
        {"reregister": True}
    [stats] = d.status(job)["shard_stats"]
    assert stats["shard"] == 1 and stats["addr"] == sd.SHARDS[1]
    assert stats["version"] is None and stats["epoch"] == 3 and stats["policy"] == "7"
    assert stats["clocks"] == {"p1": 4} and stats["staleness_hist"] == {"1": 2}
    assert d.status(job)["state"] == "running"
    assert isinstance(d.ask("user", List()), Ok)


# --- 14. a restarted scheduler picks up a running job ------------------------------------------------


def test_a_job_left_running_resumes_with_its_progress_and_holders(tmp_path):
    first = sd.Driver(wall_offset=1000.0)
    first.now = 1.0
    job = sd.start(first, sd.spec(steps=10))
    first.heartbeat("w1", job, parts=sd.parts(p0=(0, 4), p1=(0, 2)))
    first.tick(2.5, alive=["w1"])                          # progress saved
    store = JobStore(tmp_path)
    for inst in first.log:                                 # what the daemon would have written
        if isinstance(inst, Persist):
            (store.insert(inst.fields) if inst.new else store.update(inst.job, inst.fields))
    [record] = store.load()
    store.close()
    assert record.id == job and record.state == "queued" and record.started == 1001.0
    assert [p["steps_done"] for p in record.progress["partitions"]] == [4, 2]

    d = sd.Driver(records=[record], incarnation=2, wall_offset=2000.0)
    d.now = 50.0
    d.register("w5")
    out = d.assign("w5")
    [started] = [p for p in sd.persists(out, job) if "state" in p.fields]
    assert started.fields.pop("progress")["partitions"][0]["steps_done"] == 4
    assert started.fields == {"state": "running", "started": 1001.0, "shards": list(sd.SHARDS)}
    assert [c.msg.epoch for c in sd.memberships(out)] == [2 * EPOCH_STRIDE + 1] * 2
    a = sd.assignment(d.ack(), "w5")
    assert a.init and a.partitions == [0, 1] and a.plan == record.plan and a.steps == [10, 10]
    partitions = d.status(job)["partitions"]
    assert [p["steps_done"] for p in partitions] == [4, 2]
    assert [p["holder"] for p in partitions] == ["w5", "w5"]
    assert partitions[0]["holders"] == [{"worker": "w1", "first": 0, "last": 4},
                                        {"worker": "w5", "first": 4, "last": 4}]
    assert partitions[1]["holders"] == [{"worker": "w1", "first": 0, "last": 2},
                                        {"worker": "w5", "first": 2, "last": 2}]
    assert d.submit(sd.spec(name="next")) == "next-2"        # sequence numbers go on after the stored ones


def test_a_shard_registering_again_elsewhere_takes_its_jobs_along():
    d = sd.Driver()
    job = sd.start(d, sd.spec())
    run = d.m.runs[job]
    # While shard 1 is alive, another server cannot take its id ...
    refused = d.ask("server1", Register(role="server", addr="tcp://127.0.0.9:7100", shard=1))
    sd.assert_error(refused, "bad_state", "shard 1 is registered at", "evict-shard")
    # ... until an admin evicts it (or it is declared dead).
    assert d.ask("admin", Evict(shard=1)).body == {"shard": 1, "addr": sd.SHARDS[1]}
    out = d.send("server1", Register(role="server", addr="tcp://127.0.0.9:7100", shard=1))
    assert [p.fields for p in sd.persists(out, job)] == [{"shards": [sd.SHARDS[0], "tcp://127.0.0.9:7100"]}]
    [again] = sd.memberships(out)                                   # only the moved shard hears it again
    assert again.addr == "tcp://127.0.0.9:7100" and again.msg.epoch == run.epoch
    assert again.msg.holders == {"p0": "w1", "p1": "w1"}
    assert d.heartbeat("w1", job).body["shards"] == [sd.SHARDS[0], "tcp://127.0.0.9:7100"]


def test_an_evicted_server_cannot_take_its_id_back_but_a_restart_at_its_address_can():
    d = sd.Driver(shards=())
    assert d.ask("s", Register(role="server", addr="tcp://h:7000", shard=0, info={"instance": "first"})).body[
        "shard"] == 0
    assert d.ask("admin", Evict(shard=0)).body == {"shard": 0, "addr": "tcp://h:7000"}
    # the evicted process itself, still alive and heartbeating, is refused its id ...
    again = d.ask("s", Register(role="server", addr="tcp://h:7000", shard=0, info={"instance": "first"}))
    sd.assert_error(again, "bad_state", "evicted by an admin")
    assert d.m.servers == {}
    # ... while a new process at the same address (a restarted pod keeps its name) is let in
    restarted = d.ask("s", Register(role="server", addr="tcp://h:7000", shard=0, info={"instance": "second"}))
    assert isinstance(restarted, Ok) and d.m.servers[0].info["instance"] == "second"


# --- what these tests found in the first version of the machine (fixed since) ------------------------------


def initialising_and_joining() -> tuple:
    """A job w1 initialises while w2 waits beside it for the tables: (driver, job id)."""
    d = sd.Driver()
    job = d.submit(sd.spec())
    for w in ("w1", "w2"):
        d.register(w)
        d.assign(w)
    d.ack()
    return d, job


def test_a_joiner_takes_over_when_the_initialising_worker_dies():
    d, job = initialising_and_joining()
    run = d.m.runs[job]
    assert run.init_worker == "w1" and run.joining == {"w2"}
    d.tick(sd.TIMEOUT + 0.5, alive=["w2"])                          # w1 dies before `initialized`
    assert "w1" not in d.m.workers
    out = d.ack()
    granted = [Assignment.from_wire(m.body) for m in sd.replies(out, "w2/assign") if m.body.get("task")]
    assert run.init_worker == "w2"                               # the joiner waiting beside it takes over
    assert [(a.init, a.partitions) for a in granted] == [(True, [0, 1])]


def test_a_fatal_failure_from_a_joiner_holding_nothing_is_refused():
    d, job = initialising_and_joining()
    assert d.m.runs[job].held_by("w2") == []
    msg = d.report("w2", job, "failed", error="stale", fatal=True)
    run = d.m.runs[job]
    assert run.error == ""
    sd.assert_error(msg, "not_member")


def test_a_stored_row_with_unreadable_progress_does_not_wedge_the_scheduler():
    from protocol.jobspec import validate_job
    from ps.sched.jobs import JobRecord

    bad = JobRecord(id="bad-1", seq=1, name="bad", state="queued", spec=validate_job(sd.spec(name="bad")),
                    submitted=0.0, progress={"partitions": [{"index": 0, "holders": [{"first": 0, "last": 2}]}]})
    d = sd.Driver(records=[bad])
    d.register("w1")
    out = d.assign("w1")
    assert not [r for r in sd.replies(out, "w1/assign") if isinstance(r, Error)]
    assert d.m.metrics.get("internal_errors_total") == 0
    assert d.m.jobs["bad-1"].state == "running"


def test_training_time_before_a_restart_counts_in_the_result():
    first = sd.Driver()
    job = sd.start(first, sd.spec(workers=1, steps=10))                # initialized at t=0
    first.now = 5.0
    first.heartbeat("w1", job, parts=sd.parts(p0=(0, 5)))           # 40 examples in 5 s
    first.tick(0.0, alive=["w1"])
    record = dataclasses.replace(first.m.jobs[job], state="queued")
    assert record.progress["summary"]["train_s"] == 5.0

    d = sd.Driver(records=[record], incarnation=2)
    d.now = 100.0
    d.register("w5")
    out = d.assign("w5")
    assert sd.assignment(out + d.ack(), "w5").init
    d.report("w5", job, "plan", tensors=sd.TENSORS, nonlearned=[], train_size=sd.TRAIN_SIZE)
    d.report("w5", job, "initialized")
    d.now = 101.0
    d.report("w5", job, "done", parts=sd.parts(p0=(5, 10)))          # 40 more examples in 1 s
    d.assign("w5")
    d.report("w5", job, "final", test_accuracy=0.5)
    res = d.m.jobs[job].result
    assert res["examples"] == 80
    assert res["train_s"] == 6.0
    assert res["examples_per_s"] == pytest.approx(80 / 6.0)
