"""protocol/jobspec.py is the only schema: each section normalized on its own, the
same result through the job file and through each builder (make_optimizer,
make_policy, build_model), and one rule for each value that used to drift
(schedule.gamma, schedule.min_lr, the cnn's default hidden widths)."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from protocol.jobspec import (
    CONSISTENCY,
    DATA,
    MODEL,
    OPTIMIZER,
    SECTIONS,
    SpecError,
    _Loader,
    normalize_consistency,
    normalize_data,
    normalize_model,
    normalize_optimizer,
    normalize_section,
    validate_job,
)
from ps.optim import make_optimizer
from ps.policy import SSP, make_policy
from worker.nn.model import build_model, count_values

README = Path(__file__).resolve().parent.parent / "README.md"
REQUIRED = {"model": {"kind": "mlp"}, "data": {"source": "sklearn:digits"}, "optimizer": {}, "consistency": {}}


def job(**sections) -> dict:
    """A normalized job of 10 steps with `sections` on top of the required ones."""
    return validate_job({**REQUIRED, "steps": 10, **sections})


def readme_sections() -> dict:
    """The sections of README's "The job file" table: every field with its default (a required one: REQUIRED's)."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- defaults:begin -->\n(.*?)<!-- defaults:end -->", text, re.S).group(1)
    raw: dict = {}
    for row in block.splitlines()[2:]:
        path, default = (cell.strip() for cell in row.split(" | ")[:2])
        *outer, key = path.strip("|` ").split(".")
        into = raw
        for name in outer:
            into = into.setdefault(name, {})
        into[key] = (REQUIRED[outer[0]][key] if default == "*required*"
                     else yaml.load(default.strip("`"), Loader=_Loader))  # noqa: S506 - a SafeLoader subclass
    return {name: raw[name] for name in SECTIONS}


# --- the sections on their own ----------------------------------------------------------------------


def test_the_sections_are_the_job_files():
    assert SECTIONS == {"model": MODEL, "data": DATA, "optimizer": OPTIMIZER, "consistency": CONSISTENCY}
    assert list(job())[-4:] == list(SECTIONS)


@pytest.mark.parametrize("name", list(SECTIONS))
def test_the_defaults_are_the_ones_readme_documents(name):
    documented = readme_sections()[name]
    assert normalize_section(name, REQUIRED[name]) == documented
    assert normalize_section(name, documented) == documented


@pytest.mark.parametrize("name, partial", [
    ("model", {"kind": "mlp", "hidden": [32]}),
    ("model", {"kind": "cnn", "channels": [4], "batchnorm": True}),
    ("data", {"source": "synthetic:n=100", "batch_size": 8, "micro_batches": 4}),
    ("optimizer", {"kind": "sgd", "lr": 1.0}),
    ("optimizer", {"kind": "adam", "schedule": {"kind": "step", "gamma": 0.5}}),
    ("consistency", {"policy": "bsp"}),
    ("consistency", {"policy": "ssp", "staleness": 0}),
])
def test_a_partial_section_normalizes_as_in_a_job_file(name, partial):
    before = copy.deepcopy(partial)
    got = normalize_section(name, partial)
    assert partial == before                               # the input is not mutated
    assert list(got) == list(SECTIONS[name])               # complete, in schema order
    assert got == job(**{name: partial})[name]
    assert normalize_section(name, got) == got             # idempotent
    shorthand = {"model": normalize_model, "data": normalize_data, "optimizer": normalize_optimizer,
                 "consistency": normalize_consistency}[name]
    assert shorthand(partial) == got


def test_an_absent_section_takes_every_default_or_names_the_required_field():
    assert normalize_optimizer(None) == normalize_optimizer({}) == job()["optimizer"]
    assert normalize_consistency(None) == {"policy": "asp", "staleness": 3}
    with pytest.raises(SpecError, match=r"^model\.kind: expected a value, found nothing"):
        normalize_model(None)
    with pytest.raises(SpecError, match=r"^data\.source: expected a value, found nothing"):
        normalize_data({})


def test_an_unknown_section_name_is_a_value_error():
    with pytest.raises(ValueError, match="no job file section named 'optimiser'"):
        normalize_section("optimiser", {})


BAD_SECTIONS = [
    ("optimizer", {"lr": -0.1}, "optimizer.lr: expected a number > 0, found -0.1"),
    ("optimizer", {"schedule": {"kind": "linear"}},
     "optimizer.schedule.kind: expected one of constant, step, cosine, found 'linear'"),
    ("optimizer", {"kind": "adam", "nesterov": True},
     "optimizer.nesterov: expected false unless optimizer.kind is momentum, found True"),
    ("optimizer", "sgd", "optimizer: expected a mapping of fields, found 'sgd'"),
    ("consistency", {"policy": "eventual"}, "consistency.policy: expected one of asp, bsp, ssp, found 'eventual'"),
    ("consistency", {"policy": "bsp", "x": 1}, "consistency.x: unknown field (known fields here: policy, staleness)"),
    ("model", {"kind": "cnn", "kernel": 4}, "model.kernel: expected an odd kernel size for a cnn ('same' padding)"),
    ("model", {"kind": "cnn", "channels": []}, "model.channels: expected at least one conv stage for a cnn, found []"),
    ("model", {"kind": "mlp", "hidden": "64"}, "model.hidden: expected a list of positive integers, found '64'"),
    ("data", {"source": "sklearn:digits", "batch_size": 32, "micro_batches": 3},
     "data.micro_batches: expected a divisor of data.batch_size (32), found 3"),
]


@pytest.mark.parametrize("name, raw, message", BAD_SECTIONS, ids=[m.split(":")[0] for _, _, m in BAD_SECTIONS])
def test_a_bad_section_names_the_full_path_in_one_sentence_both_ways(name, raw, message):
    with pytest.raises(SpecError) as alone:
        normalize_section(name, raw)
    with pytest.raises(SpecError) as in_a_job:
        job(**{name: raw})
    assert str(alone.value) == str(in_a_job.value)
    assert str(alone.value).startswith(message)
    assert str(alone.value).startswith(alone.value.path + ": ")
    assert "\n" not in str(alone.value)
    assert isinstance(alone.value, ValueError)


def test_a_kernel_of_an_mlp_is_not_a_cnn_kernel():
    assert normalize_model({"kind": "mlp", "kernel": 4})["kernel"] == 4    # unused by an mlp


def test_rules_between_sections_stay_with_the_job():
    # staleness_aware is wrong only under bsp, which the optimizer section does not know.
    assert normalize_optimizer({"staleness_aware": True})["staleness_aware"] is True
    with pytest.raises(SpecError, match=r"^optimizer\.staleness_aware: expected false under bsp"):
        job(optimizer={"staleness_aware": True}, consistency={"policy": "bsp"})
    # a cosine schedule's length comes from the job's steps
    assert normalize_optimizer({"schedule": {"kind": "cosine"}})["schedule"]["total_steps"] == 0
    assert job(optimizer={"schedule": {"kind": "cosine"}})["optimizer"]["schedule"]["total_steps"] == 10


# --- the same partial section through the schema and through each builder ---------------------------


@pytest.mark.parametrize("partial", [{"kind": "sgd", "lr": 1.0}, {}, None, {"kind": "momentum", "nesterov": True},
                                     {"kind": "rmsprop", "schedule": {"kind": "cosine", "total_steps": 7}}])
def test_make_optimizer_takes_the_schemas_section(partial):
    spec = normalize_optimizer(partial)
    assert make_optimizer(partial).spec == spec
    assert make_optimizer(spec).spec == spec
    if partial is not None:
        assert make_optimizer(job(optimizer=partial)["optimizer"]).spec == spec


@pytest.mark.parametrize("partial", [{"policy": "bsp"}, {}, None, {"policy": "ssp"}, {"staleness": 9}])
def test_make_policy_takes_the_schemas_section(partial):
    spec = normalize_consistency(partial)
    for built in (make_policy(partial), make_policy(spec)):
        assert built.name == spec["policy"]
        if isinstance(built, SSP):
            assert built.staleness == spec["staleness"]


@pytest.mark.parametrize("partial, shape", [
    ({"kind": "mlp", "hidden": [32]}, (6,)),
    ({"kind": "mlp"}, (6,)),
    ({"kind": "cnn"}, (1, 8, 8)),
    ({"kind": "cnn", "channels": [3], "kernel": 5, "batchnorm": True, "dropout": 0.25}, (2, 6, 6)),
])
def test_build_model_takes_the_schemas_section(partial, shape):
    spec = normalize_model(partial)
    a = build_model(partial, shape, 4, seed=3)
    b = build_model(job(model=partial)["model"], shape, 4, seed=3)
    assert a.param_shapes() == b.param_shapes()
    assert all(np.array_equal(v, b.arrays()[k]) for k, v in a.arrays().items())
    assert count_values(partial, shape, 4) == count_values(spec, shape, 4) == sum(
        int(v.size) for v in a.arrays().values())


# --- one rule for each value that drifted ----------------------------------------------------------


def _refusals(optimizer: dict) -> list[str]:
    """The message each way of reading `optimizer` gives ("" when it is accepted)."""
    out = []
    for read in (normalize_optimizer, make_optimizer, lambda o: job(optimizer=o)):
        try:
            read(optimizer)
            out.append("")
        except SpecError as exc:
            out.append(str(exc))
    return out


@pytest.mark.parametrize("gamma, refused", [(1e-6, False), (0.1, False), (1.0, False), (1.5, True), (0.0, True),
                                            (-0.5, True)])
def test_gamma_is_in_0_1_everywhere(gamma, refused):
    messages = _refusals({"schedule": {"kind": "step", "gamma": gamma}})
    assert len(set(messages)) == 1
    if refused:
        assert messages[0] == f"optimizer.schedule.gamma: expected a number in (0, 1], found {gamma!r}"
    else:
        assert messages[0] == ""


@pytest.mark.parametrize("kind", ["constant", "step", "cosine"])
@pytest.mark.parametrize("min_lr, refused", [(0.0, False), (0.05, False), (0.1, False), (0.2, True)])
def test_min_lr_is_at_most_lr_everywhere(kind, min_lr, refused):
    messages = _refusals({"lr": 0.1, "schedule": {"kind": kind, "min_lr": min_lr}})
    assert len(set(messages)) == 1
    if refused:
        assert messages[0] == f"optimizer.schedule.min_lr: expected a number in [0, optimizer.lr = 0.1], found {min_lr}"
    else:
        assert messages[0] == ""


def test_the_default_hidden_widths_are_128_for_both_kinds_everywhere():
    documented = readme_sections()["model"]["hidden"]
    assert documented == [128]
    for kind, shape in (("mlp", (6,)), ("cnn", (1, 8, 8))):
        assert normalize_model({"kind": kind})["hidden"] == documented
        assert job(model={"kind": kind})["model"]["hidden"] == documented
        model = build_model({"kind": kind}, shape, 10)
        assert model.params["dense0.W"].shape[1] == documented[0]
        biases = [shape[0][0] for name, shape in model.param_shapes().items() if name.startswith("dense")
                  and name.endswith(".b")]
        assert biases == [*documented, 10]
