"""Every validation rule, against a real shard on a loopback port.

For each bad message: the reply is an `error` with the expected code, the
parameters are unchanged, and the next good request is answered.
"""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from protocol.codec import decode, encode
from protocol.messages import Create, Error, Load, Ok, Pull, Push, PushPull, SliceData, Stats
from protocol.plan import make_plan
from protocol.version import PROTOCOL_VERSION
from worker.client import ParamClient, ShardError

JOB = "val"
TENSORS = {"w": ((64, 40), "float32"), "b": ((40,), "float32")}
PARTITION_BYTES = 4096  # w (10,240 bytes) is cut into 3 slices


@pytest.fixture
def cluster(shard_factory, dealer):
    shard = shard_factory(0, max_message_bytes=8 << 20)
    plan = make_plan(TENSORS, 1, PARTITION_BYTES)
    client = ParamClient([shard.endpoint], plan, job=JOB, worker="good", timeout_s=5, retries=1)
    rng = np.random.default_rng(0)
    initial = {name: rng.standard_normal(shape).astype(np.float32) for name, (shape, _) in TENSORS.items()}
    client.create(initial, optimizer={"kind": "sgd", "lr": 1.0})
    sock = dealer(shard.endpoint)
    yield shard, plan, client, initial, sock
    client.close()


def request(sock, frames):
    sock.send_multipart(frames)
    return decode(sock.recv_multipart())


def push_header(**fields):
    head = {"v": PROTOCOL_VERSION, "op": "push", "rid": 41, "job": JOB, "worker": "bad", "clock": -1,
            "base_version": -1, "norm": -1.0, "s": []}
    head.update(fields)
    return msgpack.packb(head)


def good_push_frames(plan, rid=42, **overrides):
    s = plan.slices[0]
    grad = np.ones(s.count, dtype=np.float32)
    fields = dict(rid=rid, job=JOB, worker="bad", slices=(SliceData(s.sid, grad),))
    fields.update(overrides)
    return encode(Push(**fields))


def bad_frames(plan):
    """name -> (frames, expected code)."""
    s0 = plan.slices[0]
    n = s0.count
    cases = {
        "garbage bytes": ([b"\x00\xffnot msgpack at all"], "bad_frame"),
        "header not a map": ([msgpack.packb("hello")], "bad_frame"),
        "wrong protocol version": ([push_header(v=PROTOCOL_VERSION + 1)], "bad_version"),
        "unknown op": ([push_header(op="explode")], "unknown_op"),
        "op the shard does not serve": ([msgpack.packb({"v": PROTOCOL_VERSION, "op": "submit", "rid": 3})],
                                        "unknown_op"),
        "field of wrong type": ([push_header(norm="big")], "bad_field"),
        "dtype outside allow-list": ([push_header(s=[[s0.sid, "object", n, [n]]]), b"\0" * (8 * n)], "bad_dtype"),
        "dtype other than the plan's": (good_push_frames(plan, slices=(SliceData(s0.sid, np.ones(n, np.float64)),)),
                                        "bad_dtype"),
        "payload length != count x itemsize": ([push_header(s=[[s0.sid, "float32", n, [n]]]), b"\0" * (4 * n - 1)],
                                               "bad_length"),
        "count other than the slice's": (
            good_push_frames(plan, slices=(SliceData(s0.sid, np.ones(n - 1, np.float32)),)), "bad_length"),
        "truncated frames": ([push_header(s=[[s0.sid, "float32", n, [n]], [1, "float32", 1, [1]]]),
                              np.ones(n, np.float32).tobytes()], "truncated"),
        "unknown slice id": (good_push_frames(plan, slices=(SliceData(999, np.ones(n, np.float32)),)),
                             "unknown_slice"),
        "unknown job": (good_push_frames(plan, job="nope"), "unknown_job"),
        "insane clock": ([push_header(clock=-7)], "bad_clock"),
        "oversize message": ([push_header(s=[[s0.sid, "uint8", 9 << 20, [9 << 20]]]), b"\0" * (9 << 20)],
                             "too_large"),
        "pull of unknown slice": (encode(Pull(rid=43, job=JOB, worker="bad", sids=[12345])), "unknown_slice"),
        "create with a tampered plan": (
            encode(Create(rid=44, job="other", plan={**plan.to_wire(), "digest": "0" * 16},
                          optimizer={"kind": "sgd", "lr": 1.0})), "bad_plan"),
        "create with a bad optimizer": (
            encode(Create(rid=45, job="other", plan=plan.to_wire(), optimizer={"kind": "adamx", "lr": 1.0})),
            "bad_spec"),
        "create with a bad job id": (encode(Create(rid=46, job="../etc", plan=plan.to_wire())), "bad_field"),
        "create missing some initial values": (  # none at all is fine: a `load` brings them
            encode(Create(rid=47, job="other", plan=plan.to_wire(), optimizer={"kind": "sgd", "lr": 1.0},
                          slices=(SliceData(s0.sid, np.ones(n, np.float32)),))),
            "truncated"),
        "load of a job that does not exist": (encode(Load(rid=48, job="nope", worker="w")), "unknown_job"),
    }
    return cases


CASES = sorted(bad_frames(make_plan(TENSORS, 1, PARTITION_BYTES)))


@pytest.mark.parametrize("case", CASES)
def test_bad_message_gets_error_and_changes_nothing(cluster, case):
    shard, plan, client, initial, sock = cluster
    frames, code = bad_frames(plan)[case]
    reply = request(sock, frames)
    assert isinstance(reply, Error), reply
    assert reply.code == code, reply.message
    assert reply.message and "\n" not in reply.message
    # parameters unchanged
    now = client.pull()
    for name in TENSORS:
        np.testing.assert_array_equal(now[name], initial[name])
    # the shard keeps serving: a following good request on the same socket is answered
    ok = request(sock, good_push_frames(plan, rid=1000))
    assert isinstance(ok, Ok)
    stats = request(sock, encode(Stats(rid=1001)))
    assert stats.body["rejected_total"] >= 1


def test_error_reply_names_the_request(cluster):
    _shard, plan, _client, _initial, sock = cluster
    reply = request(sock, good_push_frames(plan, rid=777, job="nope"))
    assert isinstance(reply, Error) and reply.rid == 777


def test_req_socket_envelope_is_answered(cluster, ctx):
    shard, _plan, _client, _initial, _sock = cluster
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 10_000)
    req.connect(shard.endpoint)
    req.send_multipart(encode(Stats(rid=5)))
    reply = decode(req.recv_multipart())
    req.close(0)
    assert isinstance(reply, Ok) and reply.body["jobs"][JOB]["bytes"] == 4 * (64 * 40 + 40)


def test_client_turns_error_reply_into_exception(cluster):
    _shard, plan, _client, _initial, _sock = cluster
    other = ParamClient([_shard.endpoint], plan, job="missing", timeout_s=5, retries=0)
    with pytest.raises(ShardError) as info:
        other.pull()
    other.close()
    assert info.value.code.value == "unknown_job" and "shard 0" in str(info.value)


def test_repeated_push_is_applied_once(cluster):
    _shard, plan, client, initial, sock = cluster
    frames = good_push_frames(plan, rid=5000, worker="dup")
    first = request(sock, frames)
    again = request(sock, frames)
    assert isinstance(first, Ok) and isinstance(again, Ok)
    s0 = plan.slices[0]
    got = client.pull([s0.name])[s0.name].reshape(-1)[s0.start:s0.stop]
    np.testing.assert_array_equal(got, initial[s0.name].reshape(-1)[s0.start:s0.stop] - 1.0)


def test_push_pull_returns_updated_values(cluster):
    _shard, plan, client, initial, _sock = cluster
    grads = {name: np.full(shape, 0.5, np.float32) for name, (shape, _) in TENSORS.items()}
    out = client.push_pull(grads)
    for name in TENSORS:
        np.testing.assert_array_equal(out[name], initial[name] - 0.5)


def test_create_is_idempotent_and_refuses_another_plan(cluster):
    _shard, plan, client, initial, _sock = cluster
    assert client.create(initial, optimizer={"kind": "sgd", "lr": 1.0}) is True
    other_plan = make_plan({"w": ((8,), "float32")}, 1, PARTITION_BYTES)
    other = ParamClient([_shard.endpoint], other_plan, job=JOB, timeout_s=5, retries=0)
    with pytest.raises(ShardError) as info:
        other.create({"w": np.zeros(8, np.float32)})
    other.close()
    assert info.value.code.value == "exists"


def test_concurrent_pushes_and_pulls_never_see_torn_values(cluster, dealer):
    """Zero-copy trap: a reply in flight keeps exactly the values it was sent with.

    A 4 MiB slice starts at 0; every push subtracts 1, so any consistent
    snapshot is a constant array of -k. Pipelined push_pulls on one socket
    and pulls on another must only ever see such snapshots, and the
    push_pull replies must see -1, -2, ... in order.
    """
    shard, _plan, _client, _initial, _sock = cluster
    n = 1 << 20
    plan = make_plan({"big": ((n,), "float32")}, 1, 8 << 20)
    owner = ParamClient([shard.endpoint], plan, job="cow", timeout_s=10, retries=1)
    owner.create({"big": np.zeros(n, np.float32)}, optimizer={"kind": "sgd", "lr": 1.0})
    owner.close()
    pusher, reader = dealer(shard.endpoint), dealer(shard.endpoint)
    ones = np.ones(n, np.float32)
    rounds = 12
    for i in range(rounds):
        pusher.send_multipart(encode(PushPull(rid=100 + i, job="cow", worker="p", slices=(SliceData(0, ones),))),
                              copy=False)
        reader.send_multipart(encode(Pull(rid=500 + i, job="cow", worker="r")))
    seen = []
    for i in range(rounds):
        got = decode(pusher.recv_multipart(copy=False)).slices[0].data
        assert got[0] == -(i + 1) and (got == got[0]).all(), f"push_pull reply {i} is torn or out of order"
        snap = decode(reader.recv_multipart(copy=False)).slices[0].data
        assert (snap == snap[0]).all(), f"pull reply {i} is torn"
        seen.append(float(snap[0]))
    assert all(-rounds <= v <= 0 for v in seen)


def test_table_copies_a_slice_that_a_reply_still_reads():
    """The table's side of the trap, made deterministic with a tracker that is not done."""
    from ps.optim import make_optimizer
    from ps.policy import make_policy
    from ps.table import JobTable

    class Pending:
        done = False

    plan = make_plan({"t": ((1000,), "float32")}, 1, 1 << 20)
    table = JobTable("j", plan, 0, make_optimizer({"kind": "sgd", "lr": 1.0}), make_policy({"policy": "asp"}),
                     initial={0: np.zeros(1000, np.float32)})
    sent = table.read()
    table.mark_inflight(sent, [None, Pending()])
    table.apply([SliceData(0, np.ones(1000, np.float32))], step=0)
    assert (sent[0].data == 0).all()             # the buffer in flight is untouched
    assert (table.values[0] == -1).all()          # the update went to a copy
    assert table.copies_on_write == 1
    table.apply([SliceData(0, np.ones(1000, np.float32))], step=1)
    assert table.copies_on_write == 1             # nothing in flight any more: in place
