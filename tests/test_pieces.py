"""Requests in pieces under a bound: real shards on loopback, a small piece bound.

What must hold (worker/client.py, worker/flight.py, ps/pieces.py): no
message over the bound whatever the model's size; a step in pieces does
exactly what the same step in one message does (each push counted once);
a piece sent again is not applied twice; under BSP a partition taken over
mid-step is not summed twice, and a push whose mean cannot be split is
refused with the reason; a table's values load in pieces.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from protocol.codec import decode, encode
from protocol.messages import Create, Error, Load, Membership, Ok, Pull, Push, SliceData
from protocol.plan import make_plan
from worker.client import ParamClient, ShardError

TENSORS = {"w": ((64, 40), "float32"), "b": ((40,), "float32")}   # w: 10 slices of 1,024 bytes
PARTITION_BYTES = 1024
PIECE = 2048                                                       # two slices a piece
SGD = {"kind": "sgd", "lr": 0.5}


def initial(seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(shape).astype(np.float32) for n, (shape, _) in TENSORS.items()}


def grads_of(seed):
    rng = np.random.default_rng(100 + seed)
    return {n: rng.standard_normal(shape).astype(np.float32) for n, (shape, _) in TENSORS.items()}


def client(shards, plan, job, worker="w", piece=PIECE, **kw):
    return ParamClient([s.endpoint for s in shards], plan, job=job, worker=worker, timeout_s=5, retries=1,
                       piece_bytes=piece, **kw)


def ask(sock, msg):
    sock.send_multipart(encode(msg))
    assert sock.poll(5000), f"no reply to {msg.OP}"
    return decode(sock.recv_multipart())


def test_no_message_over_the_bound(shard_factory):
    """A shard that refuses anything over 64 KiB still serves a 1 MiB model: every request is in pieces."""
    shard = shard_factory(0, max_message_bytes=64 * 1024)
    n = 1 << 18                                   # 1 MiB of float32
    plan = make_plan({"big": ((n,), "float32")}, 1, 16 * 1024)
    values = np.arange(n, dtype=np.float32)
    with client([shard], plan, "big", piece=32 * 1024) as c:
        c.create({"big": values}, optimizer=SGD)
        out = c.push_pull({"big": np.ones(n, np.float32)})
        np.testing.assert_array_equal(out["big"], values - 0.5)
        np.testing.assert_array_equal(c.pull()["big"], values - 0.5)
        assert c.stats()[0]["jobs"]["big"]["pushes"] == 1        # 32 pieces, one push
    with client([shard], plan, "big", piece=1 << 30) as whole, pytest.raises(ShardError) as info:
        whole.push({"big": np.ones(n, np.float32)})   # one message of 1 MiB: over the shard's bound
    assert info.value.code.value == "too_large"


def test_a_step_in_pieces_is_the_step_in_one_message(shard_factory):
    shards = [shard_factory(0), shard_factory(1)]
    plan = make_plan(TENSORS, 2, PARTITION_BYTES)
    with client(shards, plan, "one", piece=1 << 30) as whole, client(shards, plan, "cut") as cut:
        opt = {"kind": "adam", "lr": 0.01}
        whole.create(initial(), optimizer=opt)
        cut.create(initial(), optimizer=opt)
        for step in range(3):
            a = whole.push_pull(grads_of(step))
            b = cut.push_pull(grads_of(step))
            for name in TENSORS:
                np.testing.assert_array_equal(a[name], b[name])
        assert [s["jobs"]["cut"]["pushes"] for s in cut.stats()] == [3, 3]
        assert [s["jobs"]["cut"]["version"] for s in cut.stats()] == [3, 3]


def test_bsp_in_pieces_equals_the_mean(shard_factory):
    shards = [shard_factory(0)]
    plan = make_plan(TENSORS, 1, PARTITION_BYTES)
    start = initial()
    with client(shards, plan, "bsp", worker="a") as a, client(shards, plan, "bsp", worker="b") as b:
        a.create(start, optimizer=SGD, policy={"policy": "bsp"})
        assert isinstance(a._exchange({0: Membership(rid=900, job="bsp", epoch=1,
                                                     workers={"a": -1, "b": -1})})[0], Ok)
        results = {}

        def run(c, seed):
            results[c.worker] = c.push_pull(grads_of(seed), clock=0)

        threads = [threading.Thread(target=run, args=(c, i)) for i, c in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads) and set(results) == {"a", "b"}
        for name in TENSORS:
            want = start[name] - 0.5 * (grads_of(0)[name] + grads_of(1)[name]) / 2
            np.testing.assert_allclose(results["a"][name], want, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(results["a"][name], results["b"][name])


def piece_of(plan, grads, sids):
    flat = {n: g.reshape(-1) for n, g in grads.items()}
    return tuple(SliceData(s.sid, flat[s.name][s.start:s.stop]) for s in plan.slices if s.sid in sids)


@pytest.mark.parametrize("clock", [-1, 0])
def test_a_piece_sent_again_is_applied_once(shard_factory, dealer, clock):
    shard = shard_factory(0)
    plan = make_plan(TENSORS, 1, PARTITION_BYTES)
    start, g = initial(), grads_of(0)
    with client([shard], plan, "again") as c:
        c.create(start, optimizer=SGD)
        sock = dealer(shard.endpoint)
        first = piece_of(plan, g, {0, 1})
        for _ in range(2):   # the same piece twice (its reply was lost, say)
            assert isinstance(ask(sock, Push(rid=7, job="again", worker="x", clock=clock, more=True,
                                             slices=first)), Ok)
        rest = piece_of(plan, g, {s.sid for s in plan.slices} - {0, 1})
        assert isinstance(ask(sock, Push(rid=8, job="again", worker="x", clock=clock, slices=rest)), Ok)
        after = c.pull()
        for name in TENSORS:
            np.testing.assert_allclose(after[name], start[name] - 0.5 * g[name], rtol=1e-6, atol=1e-6)
        assert c.stats()[0]["jobs"]["again"]["pushes"] == 1


def bsp_table(shard_factory, dealer, job):
    shard = shard_factory(0)
    plan = make_plan(TENSORS, 1, PARTITION_BYTES)
    c = client([shard], plan, job)
    c.create(initial(), optimizer=SGD, policy={"policy": "bsp"})
    return shard, plan, c, dealer(shard.endpoint)


def members(sock, job, epoch, holders):
    reply = ask(sock, Membership(rid=100 + epoch, job=job, epoch=epoch, workers=dict.fromkeys(holders, -1),
                                 holders=holders))
    assert isinstance(reply, Ok), reply


def test_bsp_partition_taken_over_mid_step_is_summed_once(shard_factory, dealer):
    """A's early piece of p0's step 0 is in the sum when A dies; B pushes the whole step again."""
    _shard, plan, c, sock = bsp_table(shard_factory, dealer, "takeover")
    try:
        start, g0, g1 = initial(), grads_of(0), grads_of(1)
        every = {s.sid for s in plan.slices}
        members(sock, "takeover", 1, {"p0": "A", "p1": "C"})
        assert isinstance(ask(sock, Push(rid=1, job="takeover", worker="A", clock=0, parts=[0], more=True,
                                         slices=piece_of(plan, g0, {0, 1}))), Ok)
        members(sock, "takeover", 2, {"p0": "B", "p1": "C"})     # A was declared dead
        late = ask(sock, Push(rid=2, job="takeover", worker="A", clock=0, parts=[0], more=True,
                              slices=piece_of(plan, g0, {2})))
        assert isinstance(late, Error) and late.code == "not_member"
        assert isinstance(ask(sock, Push(rid=3, job="takeover", worker="B", clock=0, parts=[0], more=True,
                                         slices=piece_of(plan, g0, {0, 1, 2, 3}))), Ok)
        assert isinstance(ask(sock, Push(rid=4, job="takeover", worker="B", clock=0, parts=[0],
                                         slices=piece_of(plan, g0, every - {0, 1, 2, 3}))), Ok)
        assert isinstance(ask(sock, Push(rid=5, job="takeover", worker="C", clock=0, parts=[1],
                                         slices=piece_of(plan, g1, every))), Ok)
        after = c.pull()
        for name in TENSORS:
            np.testing.assert_allclose(after[name], start[name] - 0.5 * (g0[name] + g1[name]) / 2,
                                       rtol=1e-6, atol=1e-6)
    finally:
        c.close()


def test_bsp_mean_that_cannot_be_split_is_refused(shard_factory, dealer):
    _shard, plan, c, sock = bsp_table(shard_factory, dealer, "mixed")
    try:
        g = grads_of(0)
        members(sock, "mixed", 1, {"p0": "A", "p1": "D"})
        assert isinstance(ask(sock, Push(rid=1, job="mixed", worker="A", clock=0, parts=[0], more=True,
                                         slices=piece_of(plan, g, {0}))), Ok)
        members(sock, "mixed", 2, {"p0": "B", "p1": "B"})        # A and D died; B holds both
        reply = ask(sock, Push(rid=2, job="mixed", worker="B", clock=0, parts=[0, 1], more=True,
                               slices=piece_of(plan, g, {0, 1})))
        assert isinstance(reply, Error) and reply.code == "bad_state"
        assert "slice 0 of step 0" in reply.message and "p0" in reply.message and "p1" in reply.message
        assert isinstance(ask(sock, Pull(rid=3, job="mixed", worker="B")), Ok)   # still serving
    finally:
        c.close()


def test_values_load_in_pieces(shard_factory, dealer):
    shard = shard_factory(0)
    plan = make_plan(TENSORS, 1, PARTITION_BYTES)
    sock = dealer(shard.endpoint)
    start = initial()
    assert isinstance(ask(sock, Create(rid=1, job="load", plan=plan.to_wire(), optimizer=SGD)), Ok)
    every = {s.sid for s in plan.slices}
    first = ask(sock, Load(rid=2, job="load", worker="w", slices=piece_of(plan, start, {0, 1, 2})))
    assert isinstance(first, Ok) and first.body["loaded"] is False
    early = ask(sock, Pull(rid=3, job="load", worker="w"))
    assert isinstance(early, Error) and early.code == "bad_state"
    rest = ask(sock, Load(rid=4, job="load", worker="w", slices=piece_of(plan, start, every - {0, 1, 2})))
    assert isinstance(rest, Ok) and rest.body["loaded"] is True
    with client([shard], plan, "load") as c:
        for name, value in c.pull().items():
            np.testing.assert_array_equal(value, start[name])


def test_window_bounds_what_is_in_flight(shard_factory):
    """With a window of 1, pieces go one at a time and the result is the same."""
    shard = shard_factory(0)
    plan = make_plan(TENSORS, 1, PARTITION_BYTES)
    start, g = initial(), grads_of(3)
    with client([shard], plan, "win", window=1) as c:
        c.create(start, optimizer=SGD)
        out = c.push_pull(g)
    for name in TENSORS:
        np.testing.assert_allclose(out[name], start[name] - 0.5 * g[name], rtol=1e-6, atol=1e-6)



def test_a_model_over_the_message_limit_trains_end_to_end(tmp_path):
    """`psctl run` with servers that refuse any message over 64 KiB trains a 280 KB model to success:
    the table is loaded, pushed and pulled in pieces (worker/client.py), overlap on."""
    import json

    import yaml

    from tests.procs import run_psctl

    job = {"name": "pieces", "seed": 2, "workers": 2, "steps": 30, "partition_bytes": 16384,
           "model": {"kind": "mlp", "hidden": [1024]}, "data": {"source": "sklearn:digits", "batch_size": 32},
           "optimizer": {"kind": "adam", "lr": 0.001}, "consistency": {"policy": "bsp"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = run_psctl("run", str(path), "--json", "--state-dir", str(tmp_path / "state"),
                       "--max-message-bytes", "64KiB", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["status"] == "succeeded" and summary["steps_done"] == 60, summary


def test_a_slice_over_the_message_limit_is_refused_at_submit(tmp_path):
    import yaml

    from tests.procs import run_psctl

    job = {"name": "fat-slices", "steps": 5, "partition_bytes": 65536,
           "model": {"kind": "mlp", "hidden": [1024]}, "data": {"source": "sklearn:digits"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = run_psctl("run", str(path), "--quiet", "--state-dir", str(tmp_path / "state"),
                       "--max-message-bytes", "64KiB", timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "partition_bytes: 65,536" in lines[0] and "--max-message-bytes of 65,536" in lines[0], lines


@pytest.mark.parametrize("source", ["sklearn:digits", "synthetic:n=50", "synthetic:n=9,features=7,classes=3",
                                    "synthetic:n=9,shape=1x8x8,classes=4"])
def test_the_size_refused_at_submit_is_the_models_exact_size(source):
    """For an MLP on a built-in source the scheduler's bound is the size the worker counts."""
    from protocol.jobspec import min_param_bytes, validate_job
    from worker.data import load_dataset
    from worker.nn.model import count_values

    spec = validate_job({"name": "size", "steps": 1, "model": {"kind": "mlp", "hidden": [33, 17], "batchnorm": True},
                         "data": {"source": source}})
    train, _test = load_dataset(spec["data"], seed=0)
    assert min_param_bytes(spec) == count_values(spec["model"], train.input_shape, train.num_classes) * 4
