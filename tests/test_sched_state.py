"""Event-by-event unit tests of the scheduler's state machine (ps/sched/state.py): peers,
submissions, assignments after acks, initialisation and joins, deaths, failures, long polls, and
nothing raising out of `handle`.

No sockets, no processes, no clock: tests/sched_driver.py hands the machine
one event at a time (a request from a peer, a shard's answer, a tick at a
time the test chooses) and each test asserts the exact replies, shard calls,
`Persist` instructions and state that come out. The simulated cluster of
tests/test_sched_properties.py checks invariants over random runs; these
tests pin down each rule of README.md "Semantics" on its own
(tests/test_sched_jobs.py has the rest).
"""
from __future__ import annotations

import math

import pytest

from protocol.assignment import TRAIN
from protocol.messages import Create, Error, List, Ok, Register, Report, Status, Submit
from protocol.plan import make_plan
from ps.sched.events import CallShard, Persist, Reply, ShardAnswer, Tick
from ps.sched.state import EPOCH_STRIDE, SERVER_HEARTBEAT_INTERVAL_S, SchedulerState
from tests.sched_driver import (
    SHARDS,
    TENSORS,
    TIMEOUT,
    TRAIN_SIZE,
    Driver,
    assert_error,
    assignment,
    memberships,
    parts,
    persists,
    replies,
    reply_to,
    spec,
    start,
    two_holders,
)

# --- 1. registration ---------------------------------------------------------------------------


def test_a_server_gets_its_explicit_shard_id_or_the_lowest_free_one():
    d = Driver(shards=())
    first = d.ask("s", Register(role="server", addr="tcp://h:7001", shard=1))
    assert isinstance(first, Ok) and first.body == {"heartbeat_interval_s": SERVER_HEARTBEAT_INTERVAL_S,
                                                   "heartbeat_timeout_s": TIMEOUT, "shard": 1}
    assert d.ask("s", Register(role="server", addr="tcp://h:7000", shard=-1)).body["shard"] == 0
    assert d.ask("s", Register(role="server", addr="ipc:///tmp/shard2", shard=-1)).body["shard"] == 2
    assert {k: p.addr for k, p in d.m.servers.items()} == {0: "tcp://h:7000", 1: "tcp://h:7001",
                                                           2: "ipc:///tmp/shard2"}


@pytest.mark.parametrize("addr", ["ipc://", "tcp://h:0", "tcp://h:70000", "inproc://x", "tcp://h:7000\n",
                                  "", "tcp://h"])
def test_a_server_with_a_bad_address_is_refused(addr):
    d = Driver(shards=())
    msg = d.ask("s", Register(role="server", addr=addr, shard=0, rid=42))
    assert_error(msg, "bad_field", "tcp://HOST:PORT")
    assert msg.rid == 42
    assert d.m.servers == {}


def test_a_server_with_a_shard_id_out_of_range_is_refused():
    d = Driver(shards=())
    assert_error(d.ask("s", Register(role="server", addr="tcp://h:1", shard=-2)), "bad_field", "shard")
    assert_error(d.ask("s", Register(role="server", addr="tcp://h:1", shard=4096)), "bad_field", "shard")
    assert d.m.servers == {}


def test_a_worker_registers_with_its_id_and_an_unknown_role_is_refused():
    d = Driver()
    assert_error(d.ask("w", Register(role="worker")), "bad_field", "worker id")
    assert_error(d.ask("w", Register(role="client", worker="w1")), "bad_field", "'client'")
    assert d.m.workers == {}
    ok = d.register("w1")
    assert isinstance(ok, Ok) and ok.body["shard"] == -1
    assert list(d.m.workers) == ["w1"]


# --- 2. submit -----------------------------------------------------------------------------------


def test_submit_persists_the_row_before_it_answers_with_name_seq():
    d = Driver(wall_offset=1000.0)
    d.now = 2.5
    out = d.send("user", Submit(spec=spec(name="mnist")))
    assert [type(i) for i in out] == [Persist, Reply]
    persist, reply = out
    assert persist.new and persist.job == "mnist-1"
    assert persist.fields["id"] == "mnist-1" and persist.fields["state"] == "queued"
    assert persist.fields["seq"] == 1 and persist.fields["submitted"] == 1002.5
    assert persist.fields["spec"]["workers"] == 2 and persist.fields["spec"]["optimizer"]["kind"] == "sgd"
    assert reply.peer == "user" and reply.msg.body == {"job": "mnist-1"} and reply.msg.job == "mnist-1"
    assert d.submit(spec(name="other")) == "other-2"


def test_a_repeated_submission_id_returns_the_first_job_and_persists_nothing():
    d = Driver()
    out = d.send("user", Submit(spec=spec(), submission_id="sub-a"))
    assert sum(1 for i in out if isinstance(i, Persist) and i.new) == 1
    again = d.send("user", Submit(spec=spec(name="changed"), submission_id="sub-a"))
    assert not [i for i in again if isinstance(i, Persist)]
    assert reply_to(again, "user").body == {"job": "mnist-1", "existing": True}
    assert list(d.m.jobs) == ["mnist-1"]
    assert d.submit(spec(), sid="sub-b") == "mnist-2"


@pytest.mark.parametrize("change, field", [
    ({"workers": 0}, "workers:"),
    ({"data": {"source": "sklearn:digits", "batch_size": -1}}, "data.batch_size:"),
    ({"optimizer": {"lr": -0.1}}, "optimizer.lr:"),
    ({"steps": None}, "steps:"),
    ({"bogus": 1}, "bogus"),
])
def test_a_bad_spec_is_refused_naming_the_field(change, field):
    d = Driver()
    out = d.send("user", Submit(spec=spec(**change), rid=9))
    msg = reply_to(out, "user")
    assert_error(msg, "bad_spec")
    assert msg.message.startswith(field) and msg.rid == 9
    assert not [i for i in out if isinstance(i, Persist)] and d.m.jobs == {}


def test_a_model_whose_hidden_layers_exceed_max_model_bytes_is_refused_at_submit():
    d = Driver(max_model_bytes=10_000)
    big = spec(model={"kind": "mlp", "hidden": [100, 100]})           # 100 x 100 floats alone: 40,000 bytes
    msg = d.ask("user", Submit(spec=big))
    assert_error(msg, "bad_spec", "--max-model-bytes", "10,000")
    assert d.m.jobs == {}
    assert d.submit(spec(model={"kind": "mlp", "hidden": [8]})) == "mnist-1"   # a small one passes


def test_a_submission_id_over_128_characters_is_refused():
    d = Driver()
    assert_error(d.ask("user", Submit(spec=spec(), submission_id="x" * 129)), "bad_field", "128")
    assert_error(d.ask("user", Submit(spec=spec(), submission_id="a\nb")), "bad_field", "submission_id")
    assert d.m.jobs == {}
    assert d.submit(spec(), sid="x" * 128) == "mnist-1"


# --- 3. assignment after acks --------------------------------------------------------------------


def test_an_assign_starts_a_queued_job_and_answers_only_after_every_shard_acked():
    d = Driver(wall_offset=1000.0)
    job = d.submit(spec(workers=3))
    d.now = 1.0
    d.register("w1")
    out = d.assign("w1")
    assert replies(out, "w1/assign") == []
    [started] = persists(out, job)
    progress = started.fields.pop("progress")
    assert started.fields == {"state": "running", "started": 1001.0, "shards": list(SHARDS)}
    assert progress["instances"] == {"0": "", "1": ""}   # which server processes hold its tables
    run = d.m.runs[job]
    assert run.init_worker == "w1" and run.held_by("w1") == [0, 1, 2]
    calls = memberships(out)
    assert [c.addr for c in calls] == list(SHARDS)
    for c in calls:
        assert c.msg.job == job and c.msg.epoch == EPOCH_STRIDE + 1
        assert c.msg.workers == {"p0": -1, "p1": -1, "p2": -1}
        assert c.msg.holders == {"p0": "w1", "p1": "w1", "p2": "w1"}
    assert replies(d.ack(1), "w1/assign") == []                  # one shard of two: not yet
    assert run.acked_epoch() == 0
    a = assignment(d.ack(1), "w1")
    assert a.task == TRAIN and a.init and a.job == job
    assert a.partitions == [0, 1, 2] and a.num_partitions == 3 and a.steps == [5, 5, 5]
    assert a.shards == list(SHARDS) and a.plan is None and a.epoch == EPOCH_STRIDE + 1
    assert d.m.workers["w1"].waiting is None and "w1" in run.told


def test_a_refused_membership_is_sent_again_and_the_reply_waits_for_it():
    d = Driver()
    job = d.submit(spec())
    d.register("w1")
    d.assign("w1")
    first, second = d.pending
    d.pending = []
    out = d.handle(ShardAnswer(first.call, Ok(rid=1), d.now))
    out += d.handle(ShardAnswer(second.call, Error(code="bad_state", message="no"), d.now))
    assert replies(out, "w1/assign") == []
    [again] = memberships(out)                                   # the refusing shard gets it again
    assert again.addr == SHARDS[1] and again.msg.epoch == d.m.runs[job].epoch
    assert assignment(d.ack(), "w1").partitions == [0, 1]


def test_no_job_starts_without_a_live_shard_zero():
    d = Driver(shards=())
    job = d.submit(spec())
    d.register("w1")
    out = d.assign("w1")
    assert out == [] and d.m.jobs[job].state == "queued" and d.m.runs == {}
    out = d.send("s", Register(role="server", addr="tcp://h:1", shard=0))
    assert d.m.jobs[job].state == "running"
    assert [c.addr for c in memberships(out)] == ["tcp://h:1"]


# --- 4. the initialising worker, joiners and releases --------------------------------------------


def test_init_plan_steps_of_an_epochs_job_and_joiners_take_released_partitions():
    d = Driver()
    job = d.submit(spec(workers=3, steps=None, epochs=2, data={"source": "sklearn:digits", "batch_size": 4}))
    for w in ("w1", "w2", "w3", "w4"):
        d.register(w)
        d.assign(w)
    run = d.m.runs[job]
    assert run.init_worker == "w1" and run.joining == {"w2", "w3"}    # one joiner per other partition
    assert d.m.workers["w4"].job is None
    out = d.ack()
    a = assignment(out, "w1")
    assert a.init and a.partitions == [0, 1, 2] and a.steps == []      # not measured yet
    assert replies(out, "w2/assign") == replies(out, "w3/assign") == []

    # Only the initialising worker sends the plan.
    assert_error(d.report("w2", job, "plan", tensors=TENSORS, nonlearned=[], train_size=TRAIN_SIZE),
                 "not_member", "only the worker initialising")
    assert run.plan is None

    out = d.send("w1/report", Report(worker="w1", job=job, event="plan",
                                     state={"tensors": TENSORS, "nonlearned": [], "train_size": TRAIN_SIZE}))
    plan = make_plan({"w": ((4, 2), "float32"), "b": ((2,), "float32")}, 2, run.spec["partition_bytes"])
    # The scheduler creates the tables (without values: the worker loads them), and answers the
    # plan once every shard has one.
    creates = [i for i in out if isinstance(i, CallShard) and isinstance(i.msg, Create)]
    assert [c.addr for c in creates] == list(SHARDS) and all(c.msg.plan == plan.to_wire() for c in creates)
    assert all(c.msg.slices == () for c in creates) and not replies(out, "w1/report")
    [saved] = persists(out, job)
    d.ack(1)
    assert not replies(d.log, "w1/report")
    out = d.ack()
    body = reply_to(out, "w1/report").body
    assert body["plan"] == plan.to_wire() and body["shards"] == list(SHARDS)
    # epochs 2 x ceil(size / 4) over partitions of 9, 8 and 8 examples
    assert body["steps"] == [2 * math.ceil(9 / 4), 2 * math.ceil(8 / 4), 2 * math.ceil(8 / 4)] == [6, 4, 4]
    assert saved.fields == {"plan": plan.to_wire(), "nonlearned": [], "tensors": TENSORS}

    # Tables created: the initialising worker is asked to give back what the joiners take.
    view = d.report("w1", job, "initialized").body
    assert view["partitions"] == [0, 1, 2] and view["release"] == [1, 2] and view["stop"] is False
    assert run.train_started == d.now

    d.now = 1.0
    out = d.send("w1/report", Report(worker="w1", job=job, event="release", state={"release": [1, 2]}))
    view = reply_to(out, "w1/report").body
    assert view["partitions"] == [0] and view["release"] == []
    assert replies(out, "w2/assign") == replies(out, "w3/assign") == []      # not before the acks
    assert all(c.msg.holders == {"p0": "w1", "p1": "w2", "p2": "w3"} for c in memberships(out))
    out = d.ack()
    for w, held in (("w2", [1]), ("w3", [2])):
        a = assignment(out, w)
        assert a.task == TRAIN and not a.init and a.partitions == [held[0]]
        assert a.steps == [6, 4, 4] and a.plan == plan.to_wire() and a.epoch == run.epoch
    assert replies(out, "w4/assign") == []


def test_initialized_before_the_plan_is_refused():
    d = Driver()
    job = d.submit(spec())
    d.register("w1")
    d.assign("w1")
    d.ack()
    assert_error(d.report("w1", job, "initialized"), "not_member", "once it has the plan")
    assert not d.m.runs[job].initialized


# --- 5. deaths -------------------------------------------------------------------------------------


def test_a_dead_holders_partitions_go_to_a_live_holder_and_three_deaths_in_a_row_fail_the_job():
    d = Driver()
    job = two_holders(d, spec(steps=10))
    run = d.m.runs[job]
    d.tick(1.0, alive=["w1", "w2"])
    assert set(d.m.workers) == {"w1", "w2"}
    out = d.tick(TIMEOUT, alive=["w1"])                       # w2 silent for exactly the timeout: alive
    assert "w2" in d.m.workers and memberships(out) == []
    out = d.tick(0.5, alive=["w1"])                           # now over it: dead
    assert "w2" not in d.m.workers
    assert [p.holder for p in run.partitions] == ["w1", "w1"]
    assert [c.msg.holders for c in memberships(out)] == [{"p0": "w1", "p1": "w1"}] * 2
    p1 = d.status(job)["partitions"][1]
    assert p1["failures"] == 1 and "worker w2 stopped answering" in p1["last_error"]
    assert d.status(job)["partitions"][0]["failures"] == 0
    d.ack()
    view = d.heartbeat("w1", job).body
    assert view["partitions"] == [0, 1] and view["stop"] is False

    d.tick(TIMEOUT + 0.5)                                     # w1 dies: nobody holds anything
    assert "w1" not in d.m.workers and [p.holder for p in run.partitions] == [None, None]
    assert [p.failures for p in run.partitions] == [1, 2]
    assert d.m.jobs[job].state == "running"

    d.register("w3")
    d.assign("w3")
    assert assignment(d.ack(), "w3").partitions == [0, 1]
    out = d.tick(TIMEOUT + 0.5)                               # w3 dies: partition 1's third in a row
    assert job not in d.m.runs
    record = d.m.jobs[job]
    assert record.state == "failed"
    assert record.error.startswith("partition 1 failed 3 times in a row; last error: worker w3 stopped answering")
    [ended] = [p for p in persists(out, job) if "state" in p.fields]
    assert ended.fields["state"] == "failed" and ended.fields["error"] == record.error
    assert [p["failures"] for p in record.result["partitions"]] == [2, 3]


def test_progress_resets_a_partitions_failure_count():
    d = Driver()
    job = two_holders(d, spec(steps=10))
    run = d.m.runs[job]
    d.tick(TIMEOUT + 0.5, alive=["w1"])                       # w2 dies
    assert [p.failures for p in run.partitions] == [0, 1]
    d.ack()
    d.heartbeat("w1", job, parts=parts(p1=(0, 1)))           # partition 1 moves under its new holder
    assert [p.failures for p in run.partitions] == [0, 0]
    d.tick(TIMEOUT + 0.5)                                     # w1 dies: one failure each, not two
    assert [p.failures for p in run.partitions] == [1, 1]
    assert d.m.jobs[job].state == "running"


def test_a_dead_workers_steps_stay_in_its_segment_and_the_new_holder_continues():
    d = Driver()
    job = two_holders(d, spec(steps=10))
    d.heartbeat("w2", job, parts=parts(p1=(0, 3)))
    d.tick(TIMEOUT + 0.5, alive=["w1"])
    d.ack()
    d.heartbeat("w1", job, parts=parts(p1=(3, 5)))
    p1 = d.status(job)["partitions"][1]
    assert p1["steps_done"] == 5 and p1["holder"] == "w1" and p1["examples"] == 5 * 8
    # w1 held it first (it initialised the job) and gave it back untrained; w2 trained 0..3; w1 goes on from 3.
    assert p1["holders"] == [{"worker": "w1", "first": 0, "last": 0}, {"worker": "w2", "first": 0, "last": 3},
                             {"worker": "w1", "first": 3, "last": 5}]
    assert p1["failures"] == 0                               # reset by w1's progress


def test_a_worker_declared_dead_is_told_to_register_again_and_stop():
    d = Driver()
    job = two_holders(d, spec(steps=10))
    d.tick(TIMEOUT + 0.5, alive=["w1"])
    assert d.heartbeat("w2", job, parts=parts(p1=(0, 9))).body == {"reregister": True, "stop": True}
    assert_error(d.report("w2", job, "done"), "bad_state", "not registered")
    assert d.m.runs[job].partitions[1].done_steps == 0


# --- 6. failures -------------------------------------------------------------------------------------


def test_a_non_fatal_failure_counts_one_failure_per_held_partition():
    d = Driver()
    job = start(d, spec())
    msg = d.report("w1", job, "failed", error="MemoryError: out of memory")
    assert isinstance(msg, Ok) and msg.body["stop"] is True
    run = d.m.runs[job]
    assert [(p.failures, p.last_error, p.holder) for p in run.partitions] == \
        [(1, "MemoryError: out of memory", None)] * 2
    assert d.m.workers["w1"].job is None and run.error == "" and d.m.jobs[job].state == "running"


def test_a_fatal_failure_fails_the_job_at_once_with_its_text():
    d = Driver()
    job = start(d, spec())
    out = d.send("w1/report", Report(worker="w1", job=job, event="failed",
                                     state={"error": "diverged at step 12 (partition 1): loss nan", "fatal": True}))
    assert reply_to(out, "w1/report").body["stop"] is True
    assert job not in d.m.runs
    record = d.m.jobs[job]
    assert record.state == "failed" and record.error == "diverged at step 12 (partition 1): loss nan"
    [ended] = [p for p in persists(out, job) if "state" in p.fields]
    assert ended.fields["state"] == "failed" and ended.fields["error"] == record.error
    assert d.status(job)["error"] == record.error


def test_a_failure_from_a_worker_without_a_part_in_the_job_is_refused_and_changes_nothing():
    d = Driver()
    job = start(d, spec())
    d.register("w9")
    msg = d.ask("w9/report", Report(worker="w9", job=job, event="failed", rid=77,
                                    state={"error": "boom", "fatal": True}))
    assert_error(msg, "not_member", "'w9' has no part in job")
    assert msg.rid == 77
    run = d.m.runs[job]
    assert run.error == "" and not run.stopping and d.m.jobs[job].state == "running"
    assert [(p.failures, p.holder) for p in run.partitions] == [(0, "w1"), (0, "w1")]


def test_a_report_from_an_unregistered_worker_is_bad_state():
    d = Driver()
    job = start(d, spec())
    assert_error(d.report("ghost", job, "failed", error="x"), "bad_state", "'ghost' is not registered")
    assert_error(d.report("ghost", job, "nonsense"), "bad_field", "unknown report event")
    assert [p.failures for p in d.m.runs[job].partitions] == [0, 0]


# --- 10. long polls ---------------------------------------------------------------------------------------


def test_a_free_workers_assign_is_answered_empty_at_its_deadline_not_before():
    d = Driver()
    d.register("w1")
    out = d.assign("w1", wait_s=2.0, rid=5)
    assert replies(out, "w1/assign") == []
    d.now = 1.9
    assert replies(d.handle(Tick(d.now)), "w1/assign") == []
    d.now = 2.0
    msg = reply_to(d.handle(Tick(d.now)), "w1/assign")
    assert isinstance(msg, Ok) and msg.rid == 5 and msg.body == {"task": None}
    assert d.m.workers["w1"].waiting is None
    d.now = 3.0
    assert replies(d.handle(Tick(d.now)), "w1/assign") == []        # answered once


def test_a_new_assign_answers_the_held_one_empty_and_a_retry_does_not():
    d = Driver()
    d.register("w1")
    d.assign("w1", rid=1, peer="first")
    out = d.assign("w1", rid=1, peer="retry")                  # the same question again
    assert replies(out, "first") == [] and replies(out, "retry") == []
    out = d.assign("w1", rid=2, peer="second")
    msg = reply_to(out, "retry")
    assert msg.rid == 1 and msg.body == {"task": None}
    assert replies(out, "second") == []
    job = d.submit(spec(workers=1))                           # work arrives: the held one gets it
    assert d.m.runs[job].init_worker == "w1"
    msg = reply_to(d.ack(), "second")
    assert msg.rid == 2 and msg.body["task"] == TRAIN


def test_an_assign_from_an_unregistered_worker_is_bad_state():
    d = Driver()
    assert_error(reply_to(d.assign("ghost"), "ghost/assign"), "bad_state", "not registered")


# --- 11. nothing raises out of handle -------------------------------------------------------------------


class Brittle(SchedulerState):
    tick_boom = False

    def on_status(self, req, out):
        raise RuntimeError("status exploded")

    def _tick(self, now, out):
        if self.tick_boom:
            raise RuntimeError("tick exploded")
        super()._tick(now, out)


def test_an_exception_in_a_handler_is_answered_internal_and_the_machine_keeps_serving():
    d = Driver(state_cls=Brittle)
    out = d.send("user", Status(job="j-1", rid=31))
    msg = reply_to(out, "user")
    assert_error(msg, "internal", "RuntimeError: status exploded")
    assert msg.rid == 31 and msg.job == "j-1"
    assert d.m.metrics.get("internal_errors_total") == 1
    job = d.submit(spec())
    assert [j["id"] for j in d.ask("user", List()).body["jobs"]] == [job]

    d.m.tick_boom = True
    d.now = 1.0
    out = d.handle(Tick(d.now))
    assert out == [] and d.m.metrics.get("internal_errors_total") == 2
    d.m.tick_boom = False
    assert isinstance(d.register("w1"), Ok)


def test_an_event_of_an_unknown_kind_is_caught():
    d = Driver()
    assert d.m.handle("not an event") == []
    assert d.m.metrics.get("internal_errors_total") == 1
    assert isinstance(d.register("w1"), Ok)
