"""worker.trainer: gradient accumulation, evaluation, the reference trainer."""
from __future__ import annotations

import math

import numpy as np
import pytest

from protocol.jobspec import validate_job
from ps.optim import Updater, make_optimizer
from worker.data import load_dataset, worker_batches
from worker.data.base import ArrayDataset
from worker.nn.model import build_model
from worker.step import accumulate_gradients, global_norm
from worker.trainer import LocalTrainer, evaluate, total_steps


def job(**over) -> dict:
    raw = {
        "name": "t", "seed": 0, "steps": 20, "eval_every": 10,
        "model": {"kind": "mlp", "hidden": [32]},
        "data": {"source": "sklearn:digits", "batch_size": 32},
        "optimizer": {"kind": "momentum", "lr": 0.05},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return validate_job(raw)


def updater_factory(spec):
    return lambda arrays, nonlearned, optimizer: Updater(make_optimizer(optimizer), arrays, nonlearned=nonlearned)


def batch(n=24, shape=(1, 8, 8), seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, *shape), dtype=np.float32), rng.integers(0, 10, n)


# ---------------------------------------------------------------- pieces

@pytest.mark.parametrize("n, k", [(24, 4), (24, 24), (10, 3), (7, 2)])
def test_accumulate_gradients_equals_one_batch(n, k):
    spec = {"kind": "mlp", "hidden": [16, 12], "activation": "tanh"}
    x, y = batch(n)
    one = build_model(spec, (1, 8, 8), 10, seed=1)
    loss1, acc1 = one.train_step(x, y)
    many = build_model(spec, (1, 8, 8), 10, seed=1)
    many.grads["dense0.W"][...] = 123.0   # stale values must be overwritten, not added to
    loss_k, acc_k = accumulate_gradients(many, x, y, k)
    assert loss_k == pytest.approx(loss1, rel=1e-5) and acc_k == pytest.approx(acc1)
    for name, g in one.grads.items():
        np.testing.assert_allclose(many.grads[name], g, rtol=2e-5, atol=1e-6, err_msg=name)


def test_accumulate_gradients_cnn_equals_one_batch():
    spec = {"kind": "cnn", "channels": [4], "hidden": [8]}
    x, y = batch(12)
    one = build_model(spec, (1, 8, 8), 10, seed=2)
    one.train_step(x, y)
    many = build_model(spec, (1, 8, 8), 10, seed=2)
    accumulate_gradients(many, x, y, 3)
    for name, g in one.grads.items():
        np.testing.assert_allclose(many.grads[name], g, rtol=2e-5, atol=1e-6, err_msg=name)


def test_accumulate_gradients_refuses_bad_counts():
    model = build_model({"kind": "mlp", "hidden": [4]}, (1, 8, 8), 10)
    x, y = batch(4)
    for k in (0, 5):
        with pytest.raises(ValueError, match="micro_batches must be in 1..4"):
            accumulate_gradients(model, x, y, k)


def test_global_norm_sums_in_float64_and_skips_what_it_is_told():
    rng = np.random.default_rng(0)
    grads = {"a": rng.standard_normal((300, 400)).astype(np.float32),   # > one chunk
             "b": rng.standard_normal(7).astype(np.float32),
             "bn0.running_mean": np.full(5, 1e3, np.float32)}
    want = math.sqrt(sum(float(np.dot(g.astype(np.float64).ravel(), g.astype(np.float64).ravel()))
                         for name, g in grads.items() if name != "bn0.running_mean"))
    assert global_norm(grads, skip=["bn0.running_mean"]) == pytest.approx(want, rel=1e-12)
    assert global_norm({"a": np.array([3.0, 4.0], np.float32)}) == 5.0


def test_evaluate_matches_one_big_batch_in_eval_mode():
    train, test = load_dataset({"source": "sklearn:digits", "test_fraction": 0.2}, seed=0)
    model = build_model({"kind": "mlp", "hidden": [16], "dropout": 0.5, "batchnorm": True},
                        train.input_shape, 10, seed=0)
    x, y = test.take(np.arange(len(test)))
    loss_sum, correct = model.evaluate(x, y)
    for bs in (512, 100, 7):
        loss, acc = evaluate(model, test, batch_size=bs)
        assert loss == pytest.approx(loss_sum / len(test), rel=1e-5)
        assert acc == correct / len(test)
    # eval mode: dropout off and running statistics untouched, so repeatable
    before = {k: v.copy() for k, v in model.stats.items()}
    assert evaluate(model, test) == evaluate(model, test)
    for k, v in model.stats.items():
        assert np.array_equal(v, before[k])


def test_evaluate_refuses_empty():
    empty = ArrayDataset(np.zeros((0, 2), np.float32), np.zeros(0, np.int64), num_classes=2)
    model = build_model({"kind": "mlp", "hidden": [4]}, (2,), 2)
    with pytest.raises(ValueError, match="empty dataset"):
        evaluate(model, empty)


def test_total_steps_from_steps_or_epochs():
    assert total_steps(job(steps=7), 1000) == 7
    assert total_steps(job(steps=None, epochs=2), 1000) == 64      # 2 passes of ceil(1000 / 32) batches
    assert total_steps(job(steps=None, epochs=0.01), 10) == 1


# ---------------------------------------------------------------- LocalTrainer

def test_local_trainer_learns_digits_and_reports():
    spec = job(steps=150, eval_every=50)
    rows = []
    trainer = LocalTrainer(spec, update=updater_factory(spec), progress=rows.append)
    result = trainer.run()
    assert result.steps == 150 and result.stopped == "steps"
    assert result.test_accuracy > 0.9
    assert [r["step"] for r in rows] == list(range(1, 151))
    assert [r["step"] for r in rows if "test_accuracy" in r] == [50, 100, 150]
    assert rows[-1]["test_accuracy"] == result.test_accuracy
    assert result.final_loss == rows[-1]["loss"] and rows[0]["loss"] > rows[-1]["loss"]
    assert result.examples_per_s > 0 and result.wall_s >= rows[-1]["wall_s"] - 1e-9
    assert {"step", "loss", "accuracy", "examples_per_s", "wall_s"} <= set(rows[0])
    assert result.history == rows
    assert "history" not in result.summary()


def test_local_trainer_is_bit_repeatable():
    spec = job(steps=25, eval_every=0, seed=3,
               model={"kind": "mlp", "hidden": [32, 16], "dropout": 0.2, "batchnorm": True},
               data={"micro_batches": 2}, optimizer={"kind": "adam", "lr": 0.01, "clip_norm": 1.0})
    a = LocalTrainer(spec, update=updater_factory(spec))
    b = LocalTrainer(spec, update=updater_factory(spec))
    ra, rb = a.run(), b.run()
    assert ra.final_loss == rb.final_loss
    assert ra.test_loss == rb.test_loss and ra.test_accuracy == rb.test_accuracy
    assert [r["loss"] for r in ra.history] == [r["loss"] for r in rb.history]
    for name, value in a.model.arrays().items():
        assert np.array_equal(value, b.model.arrays()[name]), name
    # another seed is another run
    other = job(steps=25, eval_every=0, seed=4,
                model={"kind": "mlp", "hidden": [32, 16], "dropout": 0.2, "batchnorm": True},
                data={"micro_batches": 2}, optimizer={"kind": "adam", "lr": 0.01, "clip_norm": 1.0})
    assert LocalTrainer(other, update=updater_factory(other)).run().final_loss != ra.final_loss


def test_early_stop_at_target_accuracy():
    spec = job(steps=500, eval_every=5, target_accuracy=0.8)
    result = LocalTrainer(spec, update=updater_factory(spec)).run()
    assert result.stopped == "target"
    assert result.test_accuracy >= 0.8
    assert result.steps < 500 and result.steps % 5 == 0
    evaluated = [r for r in result.history if "test_accuracy" in r]
    assert all(r["test_accuracy"] < 0.8 for r in evaluated[:-1])


def test_eval_every_zero_means_once_per_epoch_and_at_the_end():
    spec = job(steps=None, epochs=2.5, eval_every=0, data={"batch_size": 256})
    trainer = LocalTrainer(spec, update=updater_factory(spec))
    spe = trainer.steps_per_epoch
    assert spe == 6 and trainer.total_steps == 15             # ceil(1438 / 256), ceil(2.5 * 1438 / 256)
    result = trainer.run()
    assert [r["step"] for r in result.history if "test_accuracy" in r] == [6, 12, 15]


def test_default_data_order_is_worker_zero_of_one():
    spec = job(steps=3)
    seen = []
    train, _ = load_dataset(spec["data"], seed=spec["seed"])
    ref = worker_batches(train, k=0, num=1, batch_size=32, seed=spec["seed"])

    def recording(step):
        seen.append(step)
        return ref.batch(step)

    default = LocalTrainer(spec, update=updater_factory(spec)).run()
    fed = LocalTrainer(spec, update=updater_factory(spec), batches=recording).run()
    assert seen == [0, 1, 2]
    assert fed.final_loss == default.final_loss


def test_batches_override_feeds_other_workers_examples():
    spec = job(steps=4)
    train, _ = load_dataset(spec["data"], seed=spec["seed"])
    w1 = worker_batches(train, k=1, num=2, batch_size=32, seed=0)
    trainer = LocalTrainer(spec, update=updater_factory(spec), batches=w1.batch)
    result = trainer.run()
    assert result.steps == 4
    # the same steps by hand with the same pieces give the same parameters
    model = build_model(spec["model"], train.input_shape, 10, seed=0)
    upd = Updater(make_optimizer(spec["optimizer"]), model.arrays(), nonlearned=model.nonlearned_names())
    for t in range(4):
        x, y = w1.batch(t)
        accumulate_gradients(model, x, y, 1)
        upd.apply(model.params, model.grads, step=t, norm=global_norm(model.grads))
    for name, value in model.params.items():
        assert np.array_equal(value, trainer.model.params[name]), name


def test_running_statistics_are_not_applied_twice():
    spec = job(steps=1, model={"kind": "mlp", "hidden": [16], "batchnorm": True})
    trainer = LocalTrainer(spec, update=updater_factory(spec))
    trainer.run()
    model = build_model(spec["model"], trainer.train_set.input_shape, 10, seed=0)
    x, y = worker_batches(trainer.train_set, k=0, num=1, batch_size=32, seed=0).batch(0)
    model.train_step(x, y)   # the forward's own in-place update, once
    assert model.stats
    for name, value in model.stats.items():
        assert np.array_equal(trainer.model.stats[name], value), name


class NaNUpdate:
    """An update object (not a factory) that ruins the weights on step 2."""

    def __init__(self):
        self.calls = []

    def apply(self, params, grads, *, step, norm):
        self.calls.append((step, norm))
        if step == 2:
            for p in params.values():
                p[...] = np.nan


def test_update_object_is_used_as_is_and_divergence_stops_the_run():
    spec = job(steps=50, eval_every=100)
    upd = NaNUpdate()
    result = LocalTrainer(spec, update=upd).run()
    # Step 3 computes a NaN loss from the ruined weights: it is checked before any update, so the
    # updater never sees it (as a worker never pushes it), and the run stops there.
    assert [s for s, _ in upd.calls] == [0, 1, 2]
    assert all(norm > 0 for _, norm in upd.calls)
    assert result.stopped == "diverged" and result.steps == 4
    assert "test_accuracy" in result.history[-1]


def test_cnn_trainer_runs_with_micro_batches():
    spec = job(steps=5, model={"kind": "cnn", "channels": [4], "hidden": [16]},
               data={"batch_size": 16, "micro_batches": 4})
    result = LocalTrainer(spec, update=updater_factory(spec)).run()
    assert result.steps == 5 and np.isfinite(result.final_loss)


def test_bad_data_source_raises_data_error(tmp_path):
    from worker.data import DataError

    spec = job(data={"source": f"npz:{tmp_path / 'missing.npz'}"})
    with pytest.raises(DataError, match="expected a .npz file, found no such file"):
        LocalTrainer(spec, update=updater_factory(spec))


class MirrorDevice:
    """A stand-in for a GPU Device: numpy arrays, but name "gpu", so the
    trainer takes its host-mirror path (copy grads out, update, load back)."""

    name = "gpu"
    xp = np

    def to_device(self, a):
        return np.array(a)

    def to_host(self, a):
        return np.array(a)   # always a copy, as cupy.asnumpy is

    def synchronize(self):
        pass


def test_host_mirror_path_matches_the_cpu_path_bit_for_bit():
    spec = job(steps=15, model={"kind": "mlp", "hidden": [16], "batchnorm": True},
               optimizer={"kind": "adam", "lr": 0.01})
    cpu = LocalTrainer(spec, update=updater_factory(spec))
    mirrored = LocalTrainer(spec, update=updater_factory(spec), device=MirrorDevice())
    rc, rm = cpu.run(), mirrored.run()
    assert rc.final_loss == rm.final_loss and rc.test_accuracy == rm.test_accuracy
    for name, value in cpu.model.arrays().items():
        assert np.array_equal(value, mirrored.model.arrays()[name]), name
