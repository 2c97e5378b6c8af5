"""Gradients on the wire (the job's `compression`): fp16 and top-k with error feedback.

The encoder (protocol/compression.py) against plain arithmetic, a real shard
applying what it receives (and refusing malformed top-k pairs), the job
file's field, and digits trained with each: fp16 within 0.005 of float32's
test accuracy, topk:0.01 within 0.02.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from protocol.codec import decode, encode
from protocol.compression import Compressor, parse
from protocol.jobspec import SpecError, validate_job
from protocol.messages import Error, Membership, Ok, Pull, Push, SliceData
from protocol.plan import make_plan
from worker.client import ParamClient
from worker.data import load_dataset, worker_batches
from worker.nn.model import build_model
from worker.step import accumulate_gradients
from worker.trainer import evaluate

SGD = {"kind": "sgd", "lr": 0.5}


def ask(sock, msg):
    sock.send_multipart(encode(msg))
    assert sock.poll(5000), f"no reply to {msg.OP}"
    return decode(sock.recv_multipart())


def test_parse_and_job_field():
    assert parse(None) == ("none", 1.0) and parse("fp16") == ("fp16", 1.0) and parse("topk:0.01") == ("topk", 0.01)
    base = {"name": "c", "steps": 1, "model": {"kind": "mlp"}, "data": {"source": "sklearn:digits"}}
    assert validate_job(base)["compression"] == "none"
    assert validate_job({**base, "compression": "topk:0.05"})["compression"] == "topk:0.05"
    for bad in ("topk:0", "topk:0.9", "topk:x", "fp8", 16):
        with pytest.raises(SpecError) as info:
            validate_job({**base, "compression": bad})
        assert str(info.value).startswith("compression: expected none, fp16 or topk:RATIO")


def test_topk_error_feedback_loses_nothing():
    """Whatever top-k does not send stays in the residual: sent + residual == every gradient summed."""
    rng = np.random.default_rng(0)
    comp = Compressor("topk:0.1")
    total_sent = np.zeros(1000, np.float64)
    total_grad = np.zeros(1000, np.float64)
    for _ in range(20):
        g = rng.standard_normal(1000).astype(np.float32)
        total_grad += g
        idx, vals = comp.encode(SliceData(3, g))
        assert idx.sid == vals.sid == 3 and idx.data.dtype == np.int32 and idx.data.size == 100
        assert np.all(np.diff(idx.data) > 0)
        total_sent[idx.data] += vals.data
    np.testing.assert_allclose(total_sent + comp.residual[3], total_grad, rtol=0, atol=1e-4)
    # The largest entries go first: the values sent dominate what is kept back.
    assert np.abs(vals.data).min() >= np.abs(comp.residual[3]).max() - 1e-6


def test_fp16_is_half_the_bytes():
    (sl,) = Compressor("fp16").encode(SliceData(0, np.linspace(-1, 1, 64, dtype=np.float32)))
    assert sl.data.dtype == np.float16 and sl.data.nbytes == 128


@pytest.mark.parametrize("compression", ["fp16", "topk:0.25"])
def test_shard_applies_what_arrives_in_float32(shard_factory, compression):
    shard = shard_factory(0)
    plan = make_plan({"w": ((40, 40), "float32")}, 1, 1024)
    start = np.random.default_rng(1).standard_normal((40, 40)).astype(np.float32)
    g = np.random.default_rng(2).standard_normal((40, 40)).astype(np.float32)
    with ParamClient([shard.endpoint], plan, job="c", timeout_s=5, retries=1, piece_bytes=2048,
                     compression=compression) as c:
        c.create({"w": start}, optimizer=SGD)
        out = c.push_pull({"w": g})["w"]
        assert out.dtype == np.float32
        if compression == "fp16":
            np.testing.assert_array_equal(out, start - np.float32(0.5) * g.astype(np.float16).astype(np.float32))
        else:
            changed = (out != start).reshape(-1)
            # a quarter of each 256-value slice moved, by exactly lr times its gradient
            assert changed.sum() == sum(-(-s.count // 4) for s in plan.slices)
            np.testing.assert_allclose(out.reshape(-1)[changed], (start - 0.5 * g).reshape(-1)[changed], rtol=1e-6)
            residual = np.concatenate([c.compressor.residual[s.sid] for s in plan.slices])
            np.testing.assert_allclose(start - out + 0.5 * residual.reshape(40, 40), 0.5 * g, atol=1e-6)


def test_bad_topk_pairs_are_refused_and_the_shard_serves_on(shard_factory, dealer):
    shard = shard_factory(0)
    plan = make_plan({"w": ((256,), "float32")}, 1, 1024)
    with ParamClient([shard.endpoint], plan, job="t", timeout_s=5, retries=1) as c:
        c.create({"w": np.zeros(256, np.float32)}, optimizer=SGD)
    sock = dealer(shard.endpoint)
    i32, f32 = np.int32, np.float32
    bad = {
        "odd frames": ((SliceData(0, np.array([1], i32)),), "bad_length"),
        "unsorted": ((SliceData(0, np.array([5, 1], i32)), SliceData(0, np.ones(2, f32))), "bad_length"),
        "out of range": ((SliceData(0, np.array([256], i32)), SliceData(0, np.ones(1, f32))), "bad_length"),
        "float positions": ((SliceData(0, np.array([1.0], f32)), SliceData(0, np.ones(1, f32))), "bad_dtype"),
        "two slices": ((SliceData(0, np.array([1], i32)), SliceData(1, np.ones(1, f32))), "unknown_slice"),
    }
    for rid, (name, (slices, code)) in enumerate(bad.items(), start=10):
        reply = ask(sock, Push(rid=rid, job="t", worker="x", coding="topk", slices=slices))
        assert isinstance(reply, Error) and reply.code == code, (name, reply)
    reply = ask(sock, Push(rid=30, job="t", worker="x", coding="topk",
                           slices=(SliceData(0, np.array([2, 7], i32)), SliceData(0, np.array([1, -2], f32)))))
    assert isinstance(reply, Ok)
    values = ask(sock, Pull(rid=31, job="t", worker="x")).slices[0].data
    assert values[2] == -0.5 and values[7] == 1.0 and np.count_nonzero(values) == 2


def digits_accuracy(shard_factory, compression: str | None, steps: int = 800, n: int = 2) -> float:
    """n workers (threads) train the digits MLP under BSP through a real shard; the test accuracy."""
    spec = validate_job({"name": "acc", "seed": 5, "steps": steps, "model": {"kind": "mlp", "hidden": [64]},
                         "data": {"source": "sklearn:digits", "batch_size": 32},
                         "optimizer": {"kind": "momentum", "lr": 0.05, "momentum": 0.9}})
    train, test = load_dataset(spec["data"], seed=5)
    model0 = build_model(spec["model"], train.input_shape, train.num_classes, seed=5)
    shard = shard_factory(0)
    plan = make_plan(model0.param_shapes(), 1, 16 * 1024)
    job = f"acc-{(compression or 'none').replace(':', '-')}"
    ids = [f"w{i}" for i in range(n)]
    with ParamClient([shard.endpoint], plan, job=job, worker="admin", timeout_s=10) as admin:
        admin.create(model0.arrays(), optimizer=spec["optimizer"], policy={"policy": "bsp"})
        assert isinstance(admin._exchange({0: Membership(rid=999, job=job, epoch=1,
                                                         workers=dict.fromkeys(ids, 0))})[0], Ok)
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                model = build_model(spec["model"], train.input_shape, train.num_classes, seed=5)
                batches = worker_batches(train, k=i, num=n, batch_size=32, seed=5)
                with ParamClient([shard.endpoint], plan, job=job, worker=ids[i], timeout_s=10, max_wait_s=60,
                                 compression=compression) as client:
                    for t in range(steps):
                        stream = client.stream(clock=t, out=model.arrays())
                        accumulate_gradients(model, *batches.batch(t), 1, on_layer=stream.send)
                        stream.finish()
            except BaseException as exc:  # surfaced by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(90)
        assert not any(th.is_alive() for th in threads) and not errors, errors
        final = build_model(spec["model"], train.input_shape, train.num_classes, seed=5)
        final.load(admin.pull())
    _loss, accuracy = evaluate(final, test)
    return accuracy


def test_digits_accuracy_with_compression(shard_factory):
    base = digits_accuracy(shard_factory, None)
    fp16 = digits_accuracy(shard_factory, "fp16")
    topk = digits_accuracy(shard_factory, "topk:0.01")
    print(f"digits test accuracy: float32 {base:.4f}, fp16 {fp16:.4f}, topk:0.01 {topk:.4f}")
    assert base > 0.9   # trained: the comparison means something
    assert abs(fp16 - base) <= 0.005
    assert topk >= base - 0.02
