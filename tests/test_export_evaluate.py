"""`psctl export` writes one self-describing file; `psctl evaluate` gets the job's own figures from it.

A real cluster (scheduler, two servers, two workers on loopback) trains
short digits jobs to success; `psctl export` and `psctl evaluate` run as
commands, as a user runs them. The bad-file cases need no cluster: their
files are written with the same writer (worker/export_file.py) from a
seeded model, then damaged.
"""
from __future__ import annotations

import importlib.metadata
import json
import zipfile

import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

from protocol.jobspec import load_job_file
from tests.procs import ProcGroup, run_psctl
from tests.test_jobs import job_file, psctl_json, start_cluster, status
from worker.data import load_dataset
from worker.export_file import ExportFileError, export_metadata, load_export, write_export
from worker.nn.model import build_model

JOB_WAIT_S = 180.0
MLP_NAMES = {"dense0.W", "dense0.b", "dense1.W", "dense1.b"}
CNN_MODEL = {"kind": "cnn", "channels": [8, 16], "hidden": [32], "batchnorm": True}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler, two shards (so a tensor's slices come from both) and two workers."""
    group = ProcGroup()
    try:
        yield start_cluster(group, tmp_path_factory.mktemp("cluster"), servers=2, workers=2)
    finally:
        group.reap()


def run_job(addr: str, path: str) -> dict:
    summary = psctl_json("submit", path, "--scheduler", addr, "--wait", timeout=JOB_WAIT_S)
    assert summary["status"] == "succeeded", summary
    return summary


def export(addr: str, job: str, out) -> None:
    result = run_psctl("export", job, "-o", str(out), "--scheduler", addr, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"of {job} (succeeded) to {out}" in result.stdout


def evaluate(path, *args: str) -> dict:
    return psctl_json("evaluate", str(path), *args, timeout=120)


@pytest.fixture(scope="module")
def mlp(cluster, tmp_path_factory):
    """The digits MLP trained to success (2 partitions x 150 steps) and exported: (summary, job file, .safetensors)."""
    tmp = tmp_path_factory.mktemp("mlp")
    path = job_file(tmp, name="digits-export")
    summary = run_job(cluster, path)
    out = tmp / "model.safetensors"
    export(cluster, summary["job"], out)
    return summary, path, out


# --- the job's own figures, with no cluster ------------------------------------------------------

def test_evaluate_prints_the_jobs_own_test_accuracy(cluster, mlp):
    summary, _path, out = mlp
    reported = status(cluster, summary["job"])["result"]
    got = evaluate(out)
    assert got["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
    assert got["test_accuracy"] == pytest.approx(reported["test_accuracy"], abs=1e-9)
    assert got["test_loss"] == pytest.approx(reported["test_loss"], rel=1e-6)
    # the job's held-out 20% of the 1,797 digits, and the figures the file carries say the same
    assert got["examples"] == 359 and got["job"] == summary["job"] and got["state"] == "succeeded"
    assert got["reported"]["test_accuracy"] == pytest.approx(reported["test_accuracy"], abs=1e-12)
    # for people: the same figure to the printed precision (as `psctl submit --wait` prints it)
    text = run_psctl("evaluate", str(out), timeout=120)
    assert text.returncode == 0, text.stderr
    assert f"test accuracy {summary['test_accuracy']:.4f}" in text.stdout.splitlines()[0]


def test_the_file_is_plain_safetensors_with_the_spec_in_its_metadata(mlp):
    summary, path, out = mlp
    tensors = safetensors.numpy.load_file(str(out))  # what any safetensors reader does, no pscluster code
    assert set(tensors) == MLP_NAMES
    assert tensors["dense0.W"].shape == (64, 64) and tensors["dense0.W"].dtype == np.float32
    with safe_open(str(out), framework="np") as f:
        meta = f.metadata()
    spec = json.loads(meta["spec"])
    assert spec == load_job_file(path)  # the whole validated job file: model, data, seed, optimizer, ...
    assert spec["model"]["hidden"] == [64] and spec["data"]["source"] == "sklearn:digits" and spec["seed"] == 0
    assert meta["job"] == summary["job"] and meta["state"] == "succeeded"
    assert json.loads(meta["result"])["test_accuracy"] == summary["test_accuracy"]
    assert meta["pscluster_version"] == importlib.metadata.version("pscluster")
    assert json.loads(meta["nonlearned"]) == []
    # the loader reads it back, checked, to the same spec and tensors
    spec_back, tensors_back, meta_back = load_export(str(out))
    assert spec_back == spec and meta_back["job"] == summary["job"]
    for name in MLP_NAMES:
        np.testing.assert_array_equal(tensors_back[name], tensors[name])


def test_npz_output_keeps_numpy_keys_and_carries_the_metadata_in_its_comment(cluster, mlp, tmp_path):
    summary, _path, st = mlp
    out = tmp_path / "model.npz"
    export(cluster, summary["job"], out)
    with np.load(out) as npz:  # numpy.load lists the tensors only, as exports always did
        assert set(npz.files) == MLP_NAMES
        arrays = {k: npz[k] for k in npz.files}
    for name, array in safetensors.numpy.load_file(str(st)).items():
        np.testing.assert_array_equal(arrays[name], array)  # the job is over: both exports hold the same values
    with zipfile.ZipFile(out) as zf:
        meta = json.loads(zf.comment)
    assert json.loads(meta["spec"])["model"]["hidden"] == [64] and meta["job"] == summary["job"]
    assert evaluate(out)["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)


def test_a_cnn_with_batchnorm_exports_its_running_statistics(cluster, tmp_path):
    path = job_file(tmp_path, name="digits-cnn-export", steps=60, eval_every=30, model=CNN_MODEL)
    summary = run_job(cluster, path)
    out = tmp_path / "cnn.safetensors"
    export(cluster, summary["job"], out)
    stats = {f"bn{k}.{s}" for k in range(3) for s in ("running_mean", "running_var")}
    tensors = safetensors.numpy.load_file(str(out))
    assert stats <= set(tensors)
    assert not np.allclose(tensors["bn0.running_var"], 1.0)  # trained, not the initial values
    with safe_open(str(out), framework="np") as f:
        assert set(json.loads(f.metadata()["nonlearned"])) == stats
    # equal only if the running statistics came along: evaluation normalizes with them
    assert evaluate(out)["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)


def test_export_replaces_the_file_whole_and_leaves_nothing_else(cluster, mlp, tmp_path):
    summary, _path, _st = mlp
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an older file")
    export(cluster, summary["job"], out)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left
    assert load_export(str(out))[2]["job"] == summary["job"]
    # a job the scheduler does not know: exit 1, one sentence, and nothing written
    missing = tmp_path / "none.safetensors"
    result = run_psctl("export", "nosuch-1", "-o", str(missing), "--scheduler", cluster, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert not missing.exists() and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


# --- bad files: one sentence, exit 2 (no cluster) ------------------------------------------------

def local_export(tmp_path, name="model.safetensors", *, model=None, change=None, spec_change=None) -> str:
    """An export file of a seeded, untrained digits model, as `psctl export` writes it; `change(tensors)`
    and `spec_change(spec)` damage it first."""
    path = job_file(tmp_path, name="local", model=model or {"kind": "mlp", "hidden": [16]})
    spec = load_job_file(path)
    train, _test = load_dataset(spec["data"], seed=0)
    built = build_model(spec["model"], train.input_shape, train.num_classes, seed=0)
    tensors = {k: v.copy() for k, v in built.arrays().items()}
    if change:
        change(tensors)
    if spec_change:
        spec_change(spec)
    meta = export_metadata(job="local-1", state="succeeded", spec=spec, result=None,
                           nonlearned=built.nonlearned_names())
    out = str(tmp_path / name)
    write_export(out, tensors, meta)
    return out


def refused(path, *args, code=2) -> str:
    result = run_psctl("evaluate", str(path), *args, timeout=120)
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_a_sound_local_export_evaluates(tmp_path):
    for name in ("model.safetensors", "model.npz"):
        got = evaluate(local_export(tmp_path, name))
        assert got["job"] == "local-1" and got["examples"] == 359 and 0.0 <= got["test_accuracy"] <= 1.0
        assert got["reported"] == {"test_accuracy": None, "test_loss": None}


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_a_truncated_file_is_one_sentence(tmp_path, suffix):
    good = local_export(tmp_path, "good" + suffix)
    cut = tmp_path / ("cut" + suffix)
    data = open(good, "rb").read()
    cut.write_bytes(data[:len(data) // 2])
    assert str(cut) in refused(cut)


def test_garbage_and_an_empty_file_are_one_sentence(tmp_path):
    garbage, empty = tmp_path / "garbage.safetensors", tmp_path / "empty.safetensors"
    garbage.write_bytes(b"not a model at all\n" * 10)
    empty.write_bytes(b"")
    assert "is not an export file" in refused(garbage)
    assert "is not an export file" in refused(empty)


def test_a_tensor_whose_shape_does_not_fit_the_spec_is_named(tmp_path):
    def shrink(t):
        t["dense1.W"] = t["dense1.W"][:15]  # (16, 10) in the spec's model
    bad = local_export(tmp_path, change=shrink)
    assert "tensor dense1.W has shape (15, 10), but the spec's model needs (16, 10)" in refused(bad)
    with pytest.raises(ExportFileError, match=r"tensor dense1\.W has shape \(15, 10\)"):
        load_export(bad)


@pytest.mark.parametrize("change, words", [
    (lambda t: t.pop("dense0.b"), "tensor dense0.b of the spec's model is missing"),
    (lambda t: t.update(extra=np.zeros(3, np.float32)), "tensor extra is not part of the spec's model"),
    (lambda t: t.update({"dense0.b": t["dense0.b"].astype(np.float64)}), "tensor dense0.b is float64"),
], ids=["missing", "extra", "dtype"])
def test_missing_extra_and_mistyped_tensors_are_named(tmp_path, change, words):
    assert words in refused(local_export(tmp_path, change=change))


def test_a_first_layer_that_fits_its_spec_but_not_the_data_is_named(tmp_path):
    # A consistent model for 32 features: the file alone passes, the job's 64-feature digits do not.
    def narrow(t):
        t["dense0.W"] = t["dense0.W"][:32]
    bad = local_export(tmp_path, change=narrow)
    load_export(bad)
    assert "tensor dense0.W has shape (32, 16), but the spec's model needs (64, 16)" in refused(bad)


def test_a_spec_that_does_not_validate_or_is_missing_is_one_sentence(tmp_path):
    def rnn(spec):
        spec["model"]["kind"] = "rnn"
    bad = local_export(tmp_path, spec_change=rnn)
    assert "does not validate: model.kind" in refused(bad)
    plain = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"w": np.zeros(2, np.float32)}, str(plain))  # any other safetensors file
    assert "has no job spec in its metadata" in refused(plain)


def test_data_root_finds_the_jobs_relative_data_path(tmp_path):
    digits, _ = load_dataset({"source": "sklearn:digits", "test_fraction": 0.2}, seed=0)
    x, y = digits.take(np.arange(len(digits)))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    np.savez(data_dir / "d.npz", x=x, y=y)

    def relative(spec):
        spec["data"]["source"] = "npz:d.npz"  # as a job for workers started with --data-root DIR says it
    out = local_export(tmp_path, spec_change=relative)
    got = evaluate(out, "--data-root", str(data_dir))
    _, test = load_dataset({"source": f"npz:{data_dir / 'd.npz'}", "test_fraction": 0.2}, seed=0)
    assert got["source"] == "npz:d.npz" and got["examples"] == len(test)
    # without the root the path is read from the current directory, where it is not: the command fails (1)
    assert "d.npz" in refused(out, code=1)
