"""Job files and partitions, pure: numbers as people write them, the model size bound, the
values a model holds, partitions and the steps they owe, and assignments on the wire."""
from __future__ import annotations

import copy
import math

import pytest
import yaml

from protocol.assignment import EVAL, TRAIN, Assignment
from protocol.jobspec import SpecError, min_param_bytes, parse_job_text, validate_job
from protocol.partitions import (
    epoch_steps,
    partition_index,
    partition_key,
    partition_size,
    schedule_length,
    steps_owed,
)
from worker.nn.model import build_model, count_values
from worker.trainer import total_steps

BASE_YAML = 'model: {kind: mlp}\ndata: {source: "sklearn:digits"}\n'
DIGITS = {"source": "sklearn:digits", "batch_size": 16, "test_fraction": 0.2}


def job(**fields) -> dict:
    """A normalized spec: a small mlp on digits, 10 steps, with `fields` on top."""
    raw = {"model": {"kind": "mlp"}, "data": {"source": "sklearn:digits"}, "steps": 10}
    raw.update(fields)
    if "epochs" in fields:
        raw.pop("steps")
    return validate_job(raw)


# --- protocol/jobspec.py: numbers as users write them ---------------------------------------------


@pytest.mark.parametrize("line, path, value", [
    ("optimizer: {lr: 1e-3}", ("optimizer", "lr"), 1e-3),
    ("optimizer: {eps: 1e-8}", ("optimizer", "eps"), 1e-8),
    ("optimizer: {lr: 5E-2}", ("optimizer", "lr"), 5e-2),
    ("optimizer: {lr: 1e+2}", ("optimizer", "lr"), 100.0),
    ("optimizer: {lr: 1.5e3}", ("optimizer", "lr"), 1500.0),
    ("optimizer: {weight_decay: -0}", ("optimizer", "weight_decay"), 0.0),
    ("optimizer: {weight_decay: 5e-4}", ("optimizer", "weight_decay"), 5e-4),
    ("optimizer: {schedule: {min_lr: 1e-5}}", ("optimizer", "schedule", "min_lr"), 1e-5),
    ("target_accuracy: 9e-1", ("target_accuracy",), 0.9),
])
def test_exponent_numbers_without_a_dot_are_numbers(line, path, value):
    got = parse_job_text(BASE_YAML + "steps: 5\n" + line + "\n")
    for key in path:
        got = got[key]
    assert isinstance(got, float)
    assert got == value


def test_steps_in_exponent_form_is_an_int():
    spec = parse_job_text(BASE_YAML + "steps: 5e2\n")
    assert spec["steps"] == 500
    assert type(spec["steps"]) is int


def test_epochs_in_exponent_form():
    spec = parse_job_text(BASE_YAML + "epochs: 2e0\n")
    assert spec["epochs"] == 2.0 and spec["steps"] is None


@pytest.mark.parametrize("value", ["2.5", "1e-3"])
def test_fractional_steps_are_refused_naming_the_field(value):
    with pytest.raises(SpecError) as info:
        parse_job_text(BASE_YAML + f"steps: {value}\n")
    assert info.value.path == "steps"
    assert str(info.value).startswith("steps: ")
    assert "integer" in str(info.value)


def test_a_word_is_still_not_a_number():
    with pytest.raises(SpecError) as info:
        parse_job_text(BASE_YAML + "steps: 5\noptimizer: {lr: fast}\n")
    assert info.value.path == "optimizer.lr"
    assert str(info.value).startswith("optimizer.lr: ")
    assert "'fast'" in str(info.value)


def test_pyyaml_itself_is_not_patched():
    parse_job_text(BASE_YAML + "steps: 5e2\noptimizer: {lr: 1e-3}\n")  # the job loader has been used
    assert yaml.safe_load("a: 1e-3") == {"a": "1e-3"}
    assert yaml.safe_load("a: 5e2") == {"a": "5e2"}
    assert yaml.load("a: 1e-3", Loader=yaml.SafeLoader) == {"a": "1e-3"}


# --- protocol/jobspec.py: min_param_bytes -------------------------------------------------------


def test_min_param_bytes_of_a_huge_mlp_is_huge():
    spec = job(model={"kind": "mlp", "hidden": [10_000_000, 10_000_000]})
    assert min_param_bytes(spec) >= 4e14


def test_min_param_bytes_of_a_tiny_mlp_is_exact_for_one_feature_two_classes():
    # data the scheduler cannot see (a file): one input feature, hidden 3, two classes:
    # (1*3 + 3) + (3*2 + 2) = 14 values
    spec = job(model={"kind": "mlp", "hidden": [3]}, data={"source": "npz:/data/x.npz"})
    assert min_param_bytes(spec) == 14 * 4
    # on digits (64 inputs, 10 classes: known without loading them) the size itself
    assert min_param_bytes(job(model={"kind": "mlp", "hidden": [3]})) == (64 * 3 + 3 + 3 * 10 + 10) * 4


MLP_MODELS = [
    {"kind": "mlp", "hidden": [1]},
    {"kind": "mlp", "hidden": [10]},
    {"kind": "mlp", "hidden": [128]},
    {"kind": "mlp", "hidden": [64, 32]},
    {"kind": "mlp", "hidden": [7, 300, 2]},
    {"kind": "mlp", "hidden": [16], "batchnorm": True},
    {"kind": "mlp", "hidden": [64, 32], "batchnorm": True},
    {"kind": "mlp", "hidden": [5], "dropout": 0.5, "batchnorm": True},
]
CNN_MODELS = [
    {"kind": "cnn"},
    {"kind": "cnn", "batchnorm": True},
    {"kind": "cnn", "channels": [4], "hidden": [16]},
    {"kind": "cnn", "channels": [2, 4, 8], "hidden": [8, 8]},
    {"kind": "cnn", "channels": [2, 4, 8], "hidden": [8], "batchnorm": True},
    {"kind": "cnn", "channels": [3, 5], "kernel": 5, "hidden": [12], "batchnorm": True},
    {"kind": "cnn", "channels": [1], "kernel": 1, "hidden": [1]},
]


@pytest.mark.parametrize("model", MLP_MODELS + CNN_MODELS)
def test_min_param_bytes_never_exceeds_the_real_size(model):
    spec = job(model=model)
    shape = (64,) if model["kind"] == "mlp" else (1, 8, 8)
    real = count_values(spec["model"], shape, 10) * 4
    bound = min_param_bytes(spec)
    assert 0 < bound <= real


# --- worker/nn/model.py: count_values -------------------------------------------------------------


@pytest.mark.parametrize("model", MLP_MODELS + CNN_MODELS)
def test_count_values_is_what_build_model_allocates(model):
    spec = job(model=model)["model"]
    shape = (64,) if model["kind"] == "mlp" else (1, 8, 8)
    built = build_model(spec, shape, 10, seed=0)
    assert count_values(spec, shape, 10) == sum(int(a.size) for a in built.arrays().values())


def test_count_values_with_other_shapes_and_classes():
    for spec, shape, classes in [({"kind": "mlp", "hidden": [5, 6]}, (3, 4), 7),
                                 ({"kind": "cnn", "channels": [4, 6], "hidden": [9], "batchnorm": True},
                                  (3, 12, 10), 4),
                                 ({"kind": "cnn", "channels": [2], "kernel": 3, "hidden": [3]}, (1, 5, 7), 2)]:
        built = build_model(spec, shape, classes, seed=1)
        assert count_values(spec, shape, classes) == sum(int(a.size) for a in built.arrays().values())


def test_count_values_checks_the_spec_like_build_model():
    with pytest.raises(ValueError, match="too small"):
        count_values({"kind": "cnn", "channels": [2, 2, 2, 2]}, (1, 8, 8), 10)


# --- protocol/partitions.py -----------------------------------------------------------------------


def test_partition_key_and_index_round_trip():
    for k in [*range(0, 50), 99, 1000, 123456789]:
        assert partition_key(k) == f"p{k}"
        assert partition_index(partition_key(k)) == k


@pytest.mark.parametrize("key", ["p", "p01", "p00", "q1", "p-1", "", "P1", "p1 ", " p1", "p+1", "p1.0", "w1", "pp1"])
def test_partition_index_refuses_other_names(key):
    assert partition_index(key) is None


@pytest.mark.parametrize("key", ["p\u00b2", "p\u0661"])
def test_partition_index_refuses_non_ascii_digits(key):
    assert partition_index(key) is None


def test_partition_size_is_the_strided_cut():
    for n in range(0, 41):
        for num in range(1, 8):
            sizes = [partition_size(n, k, num) for k in range(num)]
            assert sizes == [len(range(k, n, num)) for k in range(num)]
            assert sum(sizes) == n
            assert max(sizes) - min(sizes) <= 1
    assert partition_size(1437, 0, 2) == 719
    assert partition_size(1437, 1, 2) == 718
    assert partition_size(10**9 + 3, 3, 4) == len(range(3, 10**9 + 3, 4))


@pytest.mark.parametrize("n, k, num", [(10, 0, 0), (10, -1, 2), (10, 2, 2), (10, 5, 3), (-1, 0, 1), (5, 0, -2)])
def test_partition_size_refuses_bad_arguments(n, k, num):
    with pytest.raises(ValueError, match="does not exist"):
        partition_size(n, k, num)


@pytest.mark.parametrize("examples, batch, epochs, steps", [
    (100, 32, 1, 4), (100, 32, 3, 12), (64, 32, 2, 4), (65, 32, 2, 6), (719, 32, 2, 46), (718, 32, 2, 46),
    (1, 32, 1, 1), (0, 32, 1, 1), (0, 32, 5, 5), (32, 32, 1, 1), (100, 32, 0.5, 2), (100, 32, 0.01, 1),
])
def test_epoch_steps(examples, batch, epochs, steps):
    assert epoch_steps(examples, batch, epochs) == steps


def test_epoch_steps_for_integer_epochs_is_epochs_times_batches():
    for examples in range(0, 200, 7):
        for batch in (1, 3, 16, 32, 500):
            for epochs in (1, 2, 3, 10):
                assert epoch_steps(examples, batch, epochs) == epochs * max(1, math.ceil(examples / batch))


def test_steps_owed_of_a_steps_job_is_the_same_for_every_partition():
    spec = job(steps=7, workers=3)
    assert steps_owed(spec, 1437) == [7, 7, 7]
    assert steps_owed(spec, 5) == [7, 7, 7]
    assert steps_owed(spec, 1437, num=1) == [7]


def test_steps_owed_of_an_epochs_job_counts_each_partition():
    spec = job(epochs=2, workers=2, data={"source": "sklearn:digits", "batch_size": 32})
    assert steps_owed(spec, 1437) == [46, 46]          # partitions of 719 and 718 examples
    # sizes 17 and 16 with batches of 16: 2 and 1 batches per epoch
    small = job(epochs=2, workers=2, data={"source": "sklearn:digits", "batch_size": 16})
    assert steps_owed(small, 33) == [4, 2]


def test_steps_owed_of_one_partition_is_the_local_trainers_count():
    spec = job(epochs=2, workers=2, data={"source": "sklearn:digits", "batch_size": 32})
    assert steps_owed(spec, 1437, num=1) == [90]       # 2 x ceil(1437 / 32)
    assert total_steps(spec, 1437) == 90
    for n in (1, 31, 32, 33, 1000):
        assert total_steps(spec, n) == steps_owed(spec, n, num=1)[0] == 2 * math.ceil(n / 32)
    assert total_steps(job(steps=13), 1437) == 13


def test_schedule_length_fills_a_cosine_schedule():
    spec = job(epochs=2, optimizer={"schedule": {"kind": "cosine"}})
    assert spec["optimizer"]["schedule"]["total_steps"] == 0
    before = copy.deepcopy(spec)
    opt = schedule_length(spec, [46, 45, 47])
    assert opt["schedule"]["total_steps"] == 47
    assert opt["schedule"]["kind"] == "cosine"
    assert {k: v for k, v in opt.items() if k != "schedule"} == \
        {k: v for k, v in spec["optimizer"].items() if k != "schedule"}
    assert spec == before                              # the input is not mutated
    assert opt is not spec["optimizer"] and opt["schedule"] is not spec["optimizer"]["schedule"]


def test_schedule_length_leaves_other_schedules_alone():
    explicit = job(epochs=2, optimizer={"schedule": {"kind": "cosine", "total_steps": 500}})
    assert schedule_length(explicit, [46, 46])["schedule"]["total_steps"] == 500
    for kind in ("constant", "step"):
        spec = job(epochs=2, optimizer={"schedule": {"kind": kind}})
        opt = schedule_length(spec, [46, 46])
        assert opt == spec["optimizer"]
        assert opt["schedule"]["total_steps"] == 0
    cosine = job(epochs=2, optimizer={"schedule": {"kind": "cosine"}})
    assert schedule_length(cosine, [])["schedule"]["total_steps"] == 0


# --- protocol/assignment.py -----------------------------------------------------------------------


def sample_assignment(**changes) -> Assignment:
    fields = dict(task=TRAIN, job="job-1", spec={"workers": 3}, shards=["tcp://127.0.0.1:5000", "tcp://127.0.0.2:5000"],
                  partitions=[0, 2], num_partitions=3, steps=[5, 5, 4], init=True, plan={"num_shards": 2},
                  nonlearned=["bn0.running_mean"], epoch=7, max_model_bytes=1 << 20)
    fields.update(changes)
    return Assignment(**fields)


def test_assignment_round_trips():
    for a in (sample_assignment(), sample_assignment(task=EVAL, partitions=[], steps=[], init=False, plan=None,
                                                     nonlearned=[], epoch=0, max_model_bytes=0)):
        wire = a.to_wire()
        assert Assignment.from_wire(wire) == a
        assert Assignment.from_wire(dict(wire)).to_wire() == wire


def test_assignment_wire_lists_are_copies():
    a = sample_assignment()
    wire = a.to_wire()
    wire["partitions"].append(1)
    wire["shards"].append("tcp://x:1")
    assert a.partitions == [0, 2] and len(a.shards) == 2


def _wire(**changes):
    wire = sample_assignment().to_wire()
    wire.update(changes)
    return wire


@pytest.mark.parametrize("body, word", [
    (None, "map"),
    ([1, 2], "map"),
    (_wire(task="serve"), "task"),
    (_wire(task=None), "task"),
    (_wire(job=3), "'job'"),
    (_wire(spec=[]), "'spec'"),
    (_wire(shards=[]), "shards"),
    (_wire(shards=[""]), "shards"),
    (_wire(shards=["tcp://a:1", 5]), "shards"),
    (_wire(shards="tcp://a:1"), "'shards'"),
    (_wire(partitions=[3]), "partitions"),
    (_wire(partitions=[-1]), "partitions"),
    (_wire(partitions=[0, 0]), "partitions"),
    (_wire(partitions=[1.0]), "partitions"),
    (_wire(partitions=[True]), "partitions"),
    (_wire(partitions=None), "'partitions'"),
    (_wire(steps=[5, 5]), "steps"),
    (_wire(steps=[5, 5, 5, 5]), "steps"),
    (_wire(steps=[5, 0, 5]), "steps"),
    (_wire(steps=[5, True, 5]), "steps"),
    (_wire(steps=[5, 2.0, 5]), "steps"),
    (_wire(num_partitions=3.0), "'num_partitions'"),
    (_wire(num_partitions="3"), "'num_partitions'"),
    (_wire(num_partitions=True), "'num_partitions'"),
    (_wire(num_partitions=0, partitions=[], steps=[]), "num_partitions"),
    (_wire(init=1), "'init'"),
    (_wire(plan=[1]), "plan"),
    (_wire(nonlearned=[1]), "nonlearned"),
    (_wire(epoch=True), "'epoch'"),
    (_wire(epoch=1.5), "'epoch'"),
    (_wire(max_model_bytes=False), "'max_model_bytes'"),
    (_wire(max_model_bytes=None), "'max_model_bytes'"),
])
def test_assignment_from_wire_refuses(body, word):
    with pytest.raises(ValueError) as info:
        Assignment.from_wire(body)
    text = str(info.value)
    assert word in text
    assert "\n" not in text and text.count(". ") == 0


def test_assignment_missing_field_is_named():
    wire = _wire()
    del wire["epoch"]
    with pytest.raises(ValueError, match="'epoch'"):
        Assignment.from_wire(wire)
