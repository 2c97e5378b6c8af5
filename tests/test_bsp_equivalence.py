"""BSP equals one big batch (README.md, "Semantics").

N workers (threads, each with its own ParamClient and its own model copy)
train K steps of batch b against two real shards under BSP: batch t of
worker i -> accumulate_gradients -> push_pull(clock=t). The parameters they
end with must equal the single-process reference trainer's (LocalTrainer
with ps.optim.Updater) after K steps of batch N*b, where batch t is the
concatenation of the N workers' batches t in worker order: relative
difference (||a - b|| / ||b||, per tensor) under 1e-5, for SGD and Adam,
N = 1, 2, 3.

The comparison can fail: the same harness under ASP (each push applied on
its own, as a BSP that forgot to average would) lands far from the
reference, and a test checks that it does.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import zmq

from protocol.codec import decode, encode
from protocol.jobspec import validate_job
from protocol.messages import Membership, Ok
from protocol.plan import make_plan
from ps.optim import Updater, make_optimizer
from worker.client import ParamClient
from worker.data import load_dataset, worker_batches
from worker.nn.model import build_model
from worker.step import accumulate_gradients, global_norm
from worker.trainer import LocalTrainer

STEPS = 10
BATCH = 16
SHARDS = 2
# Small enough that dense0.W (64 x 32 float32 = 8 KiB) is cut into slices
# spread over both shards: each shard runs its own barrier on its slices.
PARTITION_BYTES = 2048
TOLERANCE = 1e-5
WAIT_S = 30.0

OPTIMIZERS = {
    "sgd": {"kind": "sgd", "lr": 0.1},
    "adam": {"kind": "adam", "lr": 0.01},
}


def job_spec(optimizer: dict, batch_size: int) -> dict:
    return validate_job({
        "name": "bsp-equivalence",
        "seed": 3,
        "steps": STEPS,
        "eval_every": STEPS,
        "model": {"kind": "mlp", "hidden": [32], "activation": "relu", "dropout": 0.0, "batchnorm": False},
        "data": {"source": "sklearn:digits", "batch_size": batch_size},
        "optimizer": optimizer,
    })


def rel_diffs(got: dict, want: dict) -> dict[str, float]:
    """Per tensor ||got - want|| / ||want|| (float64)."""
    assert sorted(got) == sorted(want)
    out = {}
    for name, w in want.items():
        w64 = np.asarray(w, np.float64)
        diff = np.asarray(got[name], np.float64) - w64
        out[name] = float(np.linalg.norm(diff) / max(np.linalg.norm(w64), 1e-30))
    return out


def send_membership(addrs: list[str], job: str, workers: list[str]) -> None:
    """Tell every shard the job's live workers (what the scheduler does), over a raw DEALER."""
    ctx = zmq.Context.instance()
    for k, addr in enumerate(addrs):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(addr)
        try:
            sock.send_multipart(encode(Membership(rid=100 + k, job=job, epoch=1, workers={w: 0 for w in workers})))
            reply = decode(sock.recv_multipart())
        finally:
            sock.close(0)
        assert isinstance(reply, Ok) and reply.rid == 100 + k, reply


def train_on_cluster(shard_factory, spec: dict, n: int, policy: str, *, overlap: bool = False,
                     compression: str | None = None) -> tuple[dict, list[dict]]:
    """K steps of n workers on fresh shards; returns (final server values, each worker's model arrays).

    overlap: each layer's gradient is sent as its backward finishes (worker/task.py does this),
    dense dW in row blocks made as they are sent (never whole on the worker), in pieces of at
    most one slice, so early pieces are summed before the step's last one.
    """
    shards = [shard_factory(k) for k in range(SHARDS)]
    addrs = [s.endpoint for s in shards]
    seed = spec["seed"]
    train, _test = load_dataset(spec["data"], seed=seed)
    model0 = build_model(spec["model"], train.input_shape, train.num_classes, seed=seed)
    plan = make_plan({k: v for k, v in model0.param_shapes().items()}, SHARDS, PARTITION_BYTES)
    assert all(plan.slices_on(k) for k in range(SHARDS)) and len(plan.slices_of("dense0.W")) > 1
    job = f"bsp-eq-{policy}-{spec['optimizer']['kind']}-{n}{'-overlap' if overlap else ''}"
    ids = [f"w{i}" for i in range(n)]
    with ParamClient(addrs, plan, job=job, worker="admin", timeout_s=10) as admin:
        assert admin.create(model0.arrays(), optimizer=spec["optimizer"], policy={"policy": policy}) is False
        send_membership(addrs, job, ids)

        finals: list[dict | None] = [None] * n
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                model = build_model(spec["model"], train.input_shape, train.num_classes, seed=seed)
                batches = worker_batches(train, k=i, num=n, batch_size=BATCH, seed=seed)
                arrays = model.arrays()
                with ParamClient(addrs, plan, job=job, worker=ids[i], timeout_s=10, max_wait_s=WAIT_S,
                                 piece_bytes=PARTITION_BYTES if overlap else 1 << 30,
                                 compression=compression) as client:
                    for t in range(STEPS):
                        x, y = batches.batch(t)
                        if overlap:
                            stream = client.stream(clock=t, out=arrays)
                            accumulate_gradients(model, x, y, 1, on_layer=stream.send, defer=True)
                            assert stream.sent == set(model.grads)
                            assert not model.grads["dense0.W"].any()   # dW was never held whole
                            stream.finish()
                            continue
                        accumulate_gradients(model, x, y, 1)
                        grads = dict(model.grads)
                        client.push_pull(grads, clock=t, norm=global_norm(grads), out=arrays)
                finals[i] = {k: v.copy() for k, v in arrays.items()}
            except BaseException as exc:  # surfaced by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,), name=f"worker-{i}") for i in range(n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(WAIT_S + 10)
        assert not any(th.is_alive() for th in threads), "a worker thread is stuck"
        if errors:
            raise errors[0]
        server = admin.pull(clock=-1)
        stats = admin.stats()
    for s in stats:
        table = s["jobs"][job]
        assert table["policy"] == policy
        assert s["rejected_total"] == 0
        if policy == "bsp":
            assert table["version"] == STEPS            # one update per step, not one per push
            assert table["clocks"] == {w: STEPS for w in ids}
    return server, finals


def train_reference(spec_small: dict, n: int) -> dict:
    """LocalTrainer with batch n*b: step t sees the n workers' batches t, concatenated in worker order."""
    seed = spec_small["seed"]
    spec = job_spec(spec_small["optimizer"], BATCH * n)
    train, _test = load_dataset(spec["data"], seed=seed)
    per_worker = [worker_batches(train, k=i, num=n, batch_size=BATCH, seed=seed) for i in range(n)]

    def big_batch(t: int):
        pairs = [b.batch(t) for b in per_worker]
        return np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs])

    trainer = LocalTrainer(spec, update=lambda arrays, nonlearned, optimizer: Updater(make_optimizer(optimizer), arrays,
                                                                                     nonlearned=nonlearned),
                           batches=big_batch)
    result = trainer.run()
    assert result.steps == STEPS
    return {k: v.copy() for k, v in trainer.model.arrays().items()}


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_bsp_with_n_workers_equals_one_big_batch(shard_factory, opt, n):
    spec = job_spec(OPTIMIZERS[opt], BATCH)
    server, finals = train_on_cluster(shard_factory, spec, n, "bsp")
    reference = train_reference(spec, n)
    # Every worker's last push_pull returned the values after the last barrier.
    for arrays in finals:
        for name, value in server.items():
            np.testing.assert_array_equal(arrays[name], value)
    diffs = rel_diffs(server, reference)
    assert max(diffs.values()) < TOLERANCE, diffs
    # The run moved the parameters well beyond the tolerance (the check means something).
    initial = build_model(spec["model"], (64,), 10, seed=spec["seed"]).arrays()
    assert min(rel_diffs(server, initial).values()) > 100 * TOLERANCE


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_bsp_with_overlap_equals_one_big_batch(shard_factory, opt):
    """Layer by layer, in pieces summed as they arrive: still the single-process reference."""
    spec = job_spec(OPTIMIZERS[opt], BATCH)
    server, finals = train_on_cluster(shard_factory, spec, 2, "bsp", overlap=True)
    diffs = rel_diffs(server, train_reference(spec, 2))
    assert max(diffs.values()) < TOLERANCE, diffs
    for arrays in finals:
        for name, value in server.items():
            np.testing.assert_array_equal(arrays[name], value)


def test_bsp_with_fp16_gradients_is_near_not_equal(shard_factory):
    """fp16 on the wire: close to the float32 reference, and measurably not it (the check can fail)."""
    spec = job_spec(OPTIMIZERS["sgd"], BATCH)
    server, _finals = train_on_cluster(shard_factory, spec, 2, "bsp", compression="fp16")
    diffs = rel_diffs(server, train_reference(spec, 2))
    assert 0 < max(diffs.values()) < 1e-2, diffs


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_pushes_applied_one_by_one_do_not_equal_one_big_batch(shard_factory, opt, n):
    """The same harness under ASP (each push its own update) misses the reference by far."""
    spec = job_spec(OPTIMIZERS[opt], BATCH)
    server, _finals = train_on_cluster(shard_factory, spec, n, "asp")
    reference = train_reference(spec, n)
    assert max(rel_diffs(server, reference).values()) > 1000 * TOLERANCE
