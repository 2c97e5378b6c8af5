"""Server-side optimizer math (ps/optim.py): each rule against a float64
reference, schedules, clipping, slice-vs-whole bit equality, and the spec
errors make_optimizer passes on from protocol/jobspec.py."""
from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest

from protocol.jobspec import OPTIMIZER, OPTIMIZERS, SCHEDULE, SpecError, normalize_section
from ps import optim
from ps.optim import Optimizer, Updater, make_optimizer
from worker.step import NORM_CHUNK_ELEMS, global_norm

KIND_SPECS = {
    "sgd": {"kind": "sgd", "lr": 0.1},
    "momentum": {"kind": "momentum", "lr": 0.05, "momentum": 0.9},
    "nesterov": {"kind": "momentum", "lr": 0.05, "momentum": 0.9, "nesterov": True},
    "adagrad": {"kind": "adagrad", "lr": 0.1, "eps": 1e-8},
    "rmsprop": {"kind": "rmsprop", "lr": 0.01, "rho": 0.9, "eps": 1e-8},
    "adam": {"kind": "adam", "lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
}


def reference_run(spec: dict, p0: np.ndarray, grads: list, *, grad_scale=1.0, lr_scale=1.0):
    """The textbook algorithms in float64 (Adam as in Kingma & Ba, Alg. 1)."""
    s = normalize_section("optimizer", spec)
    p = p0.astype(np.float64)
    buf = np.zeros_like(p)
    buf2 = np.zeros_like(p)
    for t, grad in enumerate(grads, start=1):
        lr = s["lr"] * lr_scale
        g = grad.astype(np.float64) * grad_scale + s["weight_decay"] * p
        if s["kind"] == "sgd":
            p = p - lr * g
        elif s["kind"] == "momentum":
            buf = s["momentum"] * buf + g
            p = p - lr * (g + s["momentum"] * buf if s["nesterov"] else buf)
        elif s["kind"] == "adagrad":
            buf = buf + g * g
            p = p - lr * g / (np.sqrt(buf) + s["eps"])
        elif s["kind"] == "rmsprop":
            buf = s["rho"] * buf + (1 - s["rho"]) * g * g
            p = p - lr * g / (np.sqrt(buf) + s["eps"])
        else:
            buf = s["beta1"] * buf + (1 - s["beta1"]) * g
            buf2 = s["beta2"] * buf2 + (1 - s["beta2"]) * g * g
            mhat = buf / (1 - s["beta1"] ** t)
            vhat = buf2 / (1 - s["beta2"] ** t)
            p = p - lr * mhat / (np.sqrt(vhat) + s["eps"])
    return p


def run(spec: dict, p0: np.ndarray, grads: list, **kw) -> tuple[np.ndarray, dict]:
    opt = make_optimizer(spec)
    p = p0.copy()
    state = opt.init_state(p)
    for i, g in enumerate(grads):
        opt.step(p, g, state, step=i, **kw)
    return p, state


def data(n=257, steps=5, seed=0):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(steps)]
    return p0, grads


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32)


# --- each rule against its reference --------------------------------------------

@pytest.mark.parametrize("name", KIND_SPECS)
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_rule_matches_float64_reference(name, wd):
    spec = {**KIND_SPECS[name], "weight_decay": wd}
    p0, grads = data()
    got, _ = run(spec, p0, grads, grad_scale=0.5, lr_scale=0.8)
    want = reference_run(spec, p0, grads, grad_scale=0.5, lr_scale=0.8)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_sgd_by_hand():
    opt = make_optimizer({"kind": "sgd", "lr": 0.5})
    p = np.array([1.0, -2.0], np.float32)
    opt.step(p, np.array([0.5, 1.0], np.float32), opt.init_state(p), step=0)
    assert p.tolist() == [0.75, -2.5]


def test_sgd_with_unit_lr_is_exact_subtraction():
    # ps-lite's check: push the same gradient 50 times, the value is 50x it.
    opt = make_optimizer({"kind": "sgd", "lr": 2.0})
    p = np.zeros(optim.CHUNK_ELEMS + 3, np.float32)
    g = np.full(p.size, -0.75, np.float32)
    st = opt.init_state(p)
    for step in range(50):
        opt.step(p, g, st, step=step, lr_scale=0.5)
    assert np.all(p == 37.5)
    p0, grads = data()
    got, _ = run({"kind": "sgd", "lr": 1.0}, p0, grads[:1])
    assert np.array_equal(bits(got), bits(p0 - grads[0]))


def test_momentum_and_nesterov_differ():
    p0, grads = data(steps=3)
    plain, _ = run(KIND_SPECS["momentum"], p0, grads)
    nest, _ = run(KIND_SPECS["nesterov"], p0, grads)
    assert not np.allclose(plain, nest)
    # First step by hand: v = g; plain p -= lr*g, nesterov p -= lr*(1+mu)*g.
    one, _ = run(KIND_SPECS["nesterov"], p0, grads[:1])
    np.testing.assert_allclose(one, p0 - 0.05 * 1.9 * grads[0], rtol=1e-6, atol=1e-7)


def test_weight_decay_is_added_to_the_gradient():
    p = np.full(4, 2.0, np.float32)
    opt = make_optimizer({"kind": "sgd", "lr": 0.1, "weight_decay": 0.5})
    state = opt.init_state(p)
    opt.step(p, np.zeros(4, np.float32), state, step=0)
    np.testing.assert_allclose(p, 2.0 - 0.1 * 0.5 * 2.0)


def test_lr_scale_and_grad_scale():
    p0, grads = data(steps=1)
    half_lr, _ = run({"kind": "sgd", "lr": 0.05}, p0, grads)
    scaled_lr, _ = run({"kind": "sgd", "lr": 0.1}, p0, grads, lr_scale=0.5)
    scaled_g, _ = run({"kind": "sgd", "lr": 0.1}, p0, grads, grad_scale=0.5)
    np.testing.assert_allclose(scaled_lr, half_lr, rtol=1e-6)
    np.testing.assert_allclose(scaled_g, half_lr, rtol=1e-6)


def test_adam_counts_updates_of_its_own_state_not_the_global_step():
    p0, grads = data(steps=2)
    opt = make_optimizer(KIND_SPECS["adam"])
    p = p0.copy()
    state = opt.init_state(p)
    for g in grads:
        opt.step(p, g, state, step=1000)     # a late joiner's slice: global step is large
    assert int(state["t"]) == 2
    np.testing.assert_allclose(p, reference_run(KIND_SPECS["adam"], p0, grads), rtol=2e-5, atol=2e-6)


def test_adam_first_step_is_lr_times_sign():
    # Bias correction makes the first update lr * g / (|g| + eps') = lr * sign(g).
    opt = make_optimizer({"kind": "adam", "lr": 0.01})
    p = np.zeros(3, np.float32)
    opt.step(p, np.array([3.0, -0.2, 1e-3], np.float32), opt.init_state(p), step=0)
    np.testing.assert_allclose(p, [-0.01, 0.01, -0.01], rtol=1e-4)


# --- slices, chunks, read-only gradients ------------------------------------------

VARIANTS = [{}, {"weight_decay": 0.01, "_gs": 0.7, "_ls": 0.9}]


@pytest.mark.parametrize("name", KIND_SPECS)
@pytest.mark.parametrize("variant", VARIANTS, ids=["plain", "decay+scales"])
def test_slices_give_the_same_bits_as_the_whole_tensor(name, variant):
    extra = {k: v for k, v in variant.items() if not k.startswith("_")}
    kw = {"grad_scale": variant.get("_gs", 1.0), "lr_scale": variant.get("_ls", 1.0)}
    opt = make_optimizer({**KIND_SPECS[name], **extra})
    n = 5 * (optim.CHUNK_ELEMS // 2 + 2469)         # crosses two chunk boundaries
    p0, grads = data(n=n, steps=3, seed=1)
    whole = p0.reshape(-1, 5).copy()                  # the trainer's view: any shape
    whole_state = opt.init_state(whole)
    cuts = [0, 1, 1000, optim.CHUNK_ELEMS + 7, n - 3, n]
    sliced = p0.copy()
    states = [opt.init_state(sliced[a:b]) for a, b in itertools.pairwise(cuts)]
    for step, g in enumerate(grads):
        opt.step(whole, g.reshape(-1, 5), whole_state, step=step, **kw)
        for (a, b), st in zip(itertools.pairwise(cuts), states):
            opt.step(sliced[a:b], g[a:b], st, step=step, **kw)
    assert np.array_equal(bits(whole.reshape(-1)), bits(sliced))
    for key in whole_state:
        if key == "t":
            assert all(int(st["t"]) == int(whole_state["t"]) for st in states)
        else:
            joined = np.concatenate([st[key] for st in states])
            assert np.array_equal(bits(whole_state[key].reshape(-1)), bits(joined))


@pytest.mark.parametrize("name", KIND_SPECS)
def test_chunk_size_does_not_change_bits(name, monkeypatch):
    spec = {**KIND_SPECS[name], "weight_decay": 0.001}
    p0, grads = data(n=1000, steps=3, seed=2)
    big, big_state = run(spec, p0, grads, grad_scale=0.3)
    monkeypatch.setattr(optim, "CHUNK_ELEMS", 7)
    small, small_state = run(spec, p0, grads, grad_scale=0.3)
    assert np.array_equal(bits(big), bits(small))
    for key in big_state:
        assert np.array_equal(big_state[key], small_state[key])


@pytest.mark.parametrize("name", KIND_SPECS)
def test_grad_is_never_written(name):
    opt = make_optimizer({**KIND_SPECS[name], "weight_decay": 0.1})
    p0, grads = data(n=optim.CHUNK_ELEMS + 5, steps=1)
    g = grads[0].copy()
    g.setflags(write=False)
    p = p0.copy()
    for gs in (1.0, 0.5):
        opt.step(p, g, opt.init_state(p), step=0, grad_scale=gs)
    assert np.array_equal(g, grads[0])
    assert not np.array_equal(p, p0)


def test_state_is_plain_arrays_a_checkpoint_can_save():
    for name, spec in KIND_SPECS.items():
        opt = make_optimizer(spec)
        p0, grads = data(steps=2)
        p, state = run(spec, p0, grads)
        assert all(isinstance(a, np.ndarray) for a in state.values()), name
        assert all(a.dtype == np.float32 for k, a in state.items() if k != "t"), name
        buf = io.BytesIO()
        np.savez(buf, **state)
        buf.seek(0)
        loaded = dict(np.load(buf))
        assert loaded.keys() == state.keys()
        # A restored state continues exactly as the live one.
        p2 = p.copy()
        opt.step(p, grads[0], state, step=2)
        opt.step(p2, grads[0], loaded, step=2)
        assert np.array_equal(bits(p), bits(p2)), name
    adam = make_optimizer({"kind": "adam"}).init_state(np.zeros(3, np.float32))
    assert adam["t"].shape == () and adam["t"].dtype == np.int64


def test_step_refuses_arrays_it_cannot_update():
    opt = make_optimizer({"kind": "sgd"})
    p = np.zeros(4, np.float32)
    st = opt.init_state(p)
    with pytest.raises(TypeError, match="param"):
        opt.step(np.zeros(4), np.zeros(4, np.float32), st, step=0)
    with pytest.raises(TypeError, match="grad"):
        opt.step(p, np.zeros(4), st, step=0)
    with pytest.raises(ValueError, match="grad: expected 4 elements"):
        opt.step(p, np.zeros(5, np.float32), st, step=0)
    with pytest.raises(ValueError, match="writeable C-contiguous"):
        opt.step(np.zeros(8, np.float32)[::2], np.zeros(4, np.float32), st, step=0)


# --- schedules and clipping -----------------------------------------------------

def lrs(schedule: dict, steps, lr=1.0) -> list:
    opt = make_optimizer({"lr": lr, "schedule": schedule})
    return [opt.lr_at(s) for s in steps]


def test_constant_schedule():
    assert lrs({}, [0, 10, 10**6], lr=0.3) == [0.3, 0.3, 0.3]


def test_step_schedule():
    got = lrs({"kind": "step", "step_size": 100, "gamma": 0.5}, [0, 99, 100, 199, 250])
    assert got == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_cosine_schedule():
    got = lrs({"kind": "cosine", "total_steps": 100, "min_lr": 0.1}, [0, 50, 100, 150])
    assert got == pytest.approx([1.0, 0.55, 0.1, 0.1])
    assert lrs({"kind": "cosine", "total_steps": 4}, [1]) == pytest.approx([(1 + math.cos(math.pi / 4)) / 2])
    # total_steps 0 (not filled in by the caller): no decay.
    assert lrs({"kind": "cosine"}, [0, 1000]) == [1.0, 1.0]


def test_warmup_multiplies_every_schedule():
    assert lrs({"warmup_steps": 4}, [0, 1, 3, 4, 100]) == [0.25, 0.5, 1.0, 1.0, 1.0]
    got = lrs({"kind": "step", "step_size": 2, "gamma": 0.5, "warmup_steps": 4}, [0, 1, 2, 3, 4])
    assert got == [0.25, 0.5, 0.375, 0.5, 0.25]
    got = lrs({"kind": "cosine", "total_steps": 10, "warmup_steps": 2}, [0, 10])
    assert got == pytest.approx([0.5 * (1 + math.cos(0)) / 2, 0.0])


def test_schedule_drives_step():
    opt = make_optimizer({"kind": "sgd", "lr": 1.0, "schedule": {"kind": "step", "step_size": 1, "gamma": 0.5}})
    p = np.zeros(1, np.float32)
    st = opt.init_state(p)
    opt.step(p, np.ones(1, np.float32), st, step=2)
    assert p[0] == -0.25


def test_clip_scale():
    off = make_optimizer({"clip_norm": 0.0})
    assert off.clip_scale(100.0) == 1.0
    on = make_optimizer({"clip_norm": 2.0})
    assert on.clip_scale(8.0) == 0.25
    assert on.clip_scale(2.0) == 1.0
    assert on.clip_scale(1.0) == 1.0
    assert on.clip_scale(0.0) == 1.0
    assert on.clip_scale(-1.0) == 1.0      # unknown norm


def test_staleness_scale():
    assert make_optimizer({}).staleness_scale(4) == 1.0
    aware = make_optimizer({"staleness_aware": True})
    assert [aware.staleness_scale(s) for s in (0, 1, 4)] == [1.0, 1.0, 0.25]


# --- the spec -------------------------------------------------------------------

def test_partial_spec_gets_defaults_and_normalizing_is_idempotent():
    opt = make_optimizer({"kind": "sgd", "lr": 1})
    assert opt.spec["lr"] == 1.0 and isinstance(opt.spec["lr"], float)
    assert opt.spec["schedule"] == {key: field.default for key, field in SCHEDULE.items()}
    assert set(opt.spec) == set(OPTIMIZER)
    assert opt.spec == normalize_section("optimizer", {"kind": "sgd", "lr": 1})
    assert normalize_section("optimizer", opt.spec) == opt.spec
    assert make_optimizer(opt.spec).spec == opt.spec
    assert make_optimizer(None).spec == normalize_section("optimizer", {})
    assert make_optimizer({"schedule": {"kind": "cosine"}}).spec["schedule"]["step_size"] == 100
    assert make_optimizer({"schedule": None}).spec["schedule"] == make_optimizer({}).spec["schedule"]


def test_every_kind_of_the_schema_has_a_rule():
    for kind in OPTIMIZERS:
        assert make_optimizer({"kind": kind}).kind == kind


BAD_SPECS = [
    ({"kind": "adamx"}, "optimizer.kind: expected one of sgd, momentum, adagrad, rmsprop, adam, found 'adamx'"),
    ({"lr": 0}, "optimizer.lr: expected a number > 0, found 0"),
    ({"lr": -0.1}, "optimizer.lr: expected a number > 0, found -0.1"),
    ({"lr": float("nan")}, "optimizer.lr: expected a number > 0"),
    ({"lr": "0.1"}, "optimizer.lr: expected a number > 0, found '0.1'"),
    ({"lr": True}, "optimizer.lr: expected a number > 0, found True"),
    ({"momentum": 1.0}, "optimizer.momentum: expected a number in [0, 1), found 1.0"),
    ({"nesterov": 1}, "optimizer.nesterov: expected true or false, found 1"),
    ({"beta1": -0.1}, "optimizer.beta1: expected a number in [0, 1)"),
    ({"beta2": 1}, "optimizer.beta2: expected a number in [0, 1)"),
    ({"eps": 0.0}, "optimizer.eps: expected a number > 0"),
    ({"rho": 1.5}, "optimizer.rho: expected a number in [0, 1)"),
    ({"weight_decay": -1e-4}, "optimizer.weight_decay: expected a number >= 0"),
    ({"clip_norm": -1}, "optimizer.clip_norm: expected a number >= 0"),
    ({"staleness_aware": "yes"}, "optimizer.staleness_aware: expected true or false"),
    ({"betas": [0.9, 0.99]}, "optimizer.betas: unknown field"),
    ({"schedule": "cosine"}, "optimizer.schedule: expected a mapping of fields, found 'cosine'"),
    ({"schedule": {"kind": "linear"}},
     "optimizer.schedule.kind: expected one of constant, step, cosine, found 'linear'"),
    ({"schedule": {"warmup_steps": -1}}, "optimizer.schedule.warmup_steps: expected an integer >= 0"),
    ({"schedule": {"warmup_steps": 2.5}}, "optimizer.schedule.warmup_steps: expected an integer >= 0"),
    ({"schedule": {"step_size": 0}}, "optimizer.schedule.step_size: expected an integer >= 1"),
    ({"schedule": {"gamma": 0}}, "optimizer.schedule.gamma: expected a number in (0, 1], found 0"),
    ({"schedule": {"gamma": 1.5}}, "optimizer.schedule.gamma: expected a number in (0, 1], found 1.5"),
    ({"schedule": {"total_steps": -5}}, "optimizer.schedule.total_steps: expected an integer >= 0"),
    ({"schedule": {"min_lr": 0.5}},
     "optimizer.schedule.min_lr: expected a number in [0, optimizer.lr = 0.1], found 0.5"),
    ({"schedule": {"min_lr": -0.1}}, "optimizer.schedule.min_lr: expected a number >= 0, found -0.1"),
    ({"kind": "sgd", "nesterov": True},
     "optimizer.nesterov: expected false unless optimizer.kind is momentum, found True"),
    ({"schedule": {"decay": 1}}, "optimizer.schedule.decay: unknown field"),
    ([1, 2], "optimizer: expected a mapping of fields, found [1, 2]"),
]


@pytest.mark.parametrize("spec,message", BAD_SPECS,
                         ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD_SPECS)])
def test_bad_spec_names_its_field_in_one_sentence(spec, message):
    with pytest.raises(SpecError) as info:     # a ValueError: the shard answers bad_spec
        make_optimizer(spec)
    text = str(info.value)
    assert text.startswith(message)
    assert text.startswith(info.value.path + ": ")
    assert "\n" not in text


# --- the reference trainer's updater ---------------------------------------------

def test_updater_learned_and_nonlearned():
    rng = np.random.default_rng(3)
    params = {"dense0.W": rng.standard_normal((3, 4)).astype(np.float32),
              "bn0.mean": np.zeros(4, np.float32)}
    opt = make_optimizer({"kind": "momentum", "lr": 0.1, "weight_decay": 0.1, "clip_norm": 1.0})
    up = Updater(opt, params, nonlearned=["bn0.mean"])
    assert set(up.state) == {"dense0.W"}
    grads = {"dense0.W": rng.standard_normal((3, 4)).astype(np.float32),
             "bn0.mean": np.full(4, 0.25, np.float32)}
    norm = global_norm(grads, skip=["bn0.mean"])
    W0 = params["dense0.W"].copy()
    W = W0.copy()
    direct_state = opt.init_state(W)
    opt.step(W, grads["dense0.W"], direct_state, step=0, grad_scale=opt.clip_scale(norm))
    up.apply(params, grads, step=0, norm=norm)
    assert np.array_equal(params["dense0.W"], W)
    assert params["bn0.mean"].tolist() == [0.25] * 4   # a delta: no decay, no clipping, no lr
    up.apply(params, grads, step=1, norm=norm, lr_scale=0.5)
    assert params["bn0.mean"].tolist() == [0.5] * 4
    arrays = up.state_arrays()
    assert list(arrays) == ["dense0.W/v"]
    fresh = Updater(opt, params, nonlearned=["bn0.mean"])
    fresh.load_state_arrays(arrays)
    assert np.array_equal(fresh.state["dense0.W"]["v"], up.state["dense0.W"]["v"])


def test_updater_without_norm_does_not_clip():
    params = {"w": np.zeros(2, np.float32)}
    up = Updater(make_optimizer({"kind": "sgd", "lr": 1.0, "clip_norm": 0.1}), params)
    up.apply(params, {"w": np.array([3.0, 4.0], np.float32)}, step=0)
    assert params["w"].tolist() == [-3.0, -4.0]
    up.apply(params, {"w": np.array([3.0, 4.0], np.float32)}, step=1, norm=5.0)
    np.testing.assert_allclose(params["w"], [-3.06, -4.08], rtol=1e-6)


def test_the_norm_updater_apply_takes_is_the_workers():
    """`norm` comes from the pushing worker (worker/trainer.py global_norm): float64, chunk by chunk."""
    grads = {"a": np.array([3.0], np.float32), "b": np.full((2, 2), 2.0, np.float32),
             "c": np.array([100.0], np.float32)}
    assert global_norm(grads, skip=["c"]) == 5.0
    assert global_norm({}) == 0.0
    big = np.full(NORM_CHUNK_ELEMS * 3 + 1, 1e-3, np.float32)
    assert global_norm({"x": big}) == pytest.approx(math.sqrt(big.size) * float(np.float32(1e-3)), rel=1e-12)
    assert isinstance(global_norm(grads), float)


def test_optimizer_class_and_factory_agree():
    assert Optimizer({"kind": "adam"}).spec == make_optimizer({"kind": "adam"}).spec
