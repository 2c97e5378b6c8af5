"""Worker data roots: idx:/npz: paths are read only under a worker's --data-root directories.

Pure tests of worker.data.roots and load_dataset(roots=...), then one cluster
of real processes: a job inside the worker's root trains, one outside fails
at once with the roots sentence and no OS error text.
"""
from __future__ import annotations

import builtins
import json
import os
import pathlib

import numpy as np
import pytest
import yaml

from tests.procs import run_psctl
from worker.data import DataError, check_roots, load_dataset, roots_from_env, write_idx
from worker.data.idx import TRAIN_IMAGES, TRAIN_LABELS
from worker.data.roots import PathGuard, is_within, outside_message
from worker.task import DataCache

OS_TEXT = ("No such file", "Errno", "ermission", "Not a directory", "Is a directory")


def spec(source: str) -> dict:
    return {"source": source, "batch_size": 8, "test_fraction": 0.25, "micro_batches": 1}


def write_npz(path, n=40, seed=0) -> str:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.normal(size=(n, 8)).astype(np.float32), y=rng.integers(0, 3, size=n))
    return str(path)


@pytest.fixture
def dirs(tmp_path):
    """A data root holding a.npz, and a directory outside it holding secret.npz."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    write_npz(root / "a.npz")
    write_npz(outside / "secret.npz")
    return root, outside


def refusal(source: str, roots) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(spec(source), roots=roots)
    text = str(info.value)
    assert "outside this worker's data roots" in text and "--data-root" in text
    assert not any(t in text for t in OS_TEXT), text
    return text


# ---------------------------------------------------------------- allowed

def test_a_file_inside_a_root_loads(dirs):
    root, _ = dirs
    train, test = load_dataset(spec(f"npz:{root}/a.npz"), roots=(str(root),))
    assert len(train) + len(test) == 40 and train.input_shape == (8,)
    # a root given through a symlink or with .. is its real path
    alias = root.parent / "alias"
    alias.symlink_to(root)
    train, _ = load_dataset(spec(f"npz:{alias}/a.npz"), roots=(f"{root}/../alias",))
    assert len(train) == 30


def test_built_in_sources_need_no_root():
    for source in ("sklearn:digits", "synthetic:n=100,features=4"):
        train, _ = load_dataset(spec(source), roots=())
        assert len(train) > 0


def test_relative_path_is_looked_up_in_each_root_in_turn(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    (second / "sub").mkdir(parents=True)
    write_npz(second / "sub" / "b.npz", n=20)
    roots = (str(first), str(second))
    train, test = load_dataset(spec("npz:sub/b.npz"), roots=roots)
    assert len(train) + len(test) == 20
    # in no root: reported missing in the first (inside it, so said plainly)
    with pytest.raises(DataError, match=rf"found no such file at {first}/sub/none.npz"):
        load_dataset(spec("npz:sub/none.npz"), roots=roots)


def test_missing_file_inside_a_root_is_reported_plainly(dirs):
    root, _ = dirs
    with pytest.raises(DataError, match=rf"npz:{root}/gone.npz: expected a .npz file, found no such file"):
        load_dataset(spec(f"npz:{root}/gone.npz"), roots=(str(root),))


def test_no_roots_means_anywhere_for_train_local(dirs, monkeypatch):
    _, outside = dirs
    train, _ = load_dataset(spec(f"npz:{outside}/secret.npz"), roots=None)
    assert len(train) == 30
    monkeypatch.chdir(outside)
    train, _ = load_dataset(spec("npz:secret.npz"))  # relative to the current directory
    assert len(train) == 30


def test_idx_directory_inside_a_root_loads(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    write_idx(d / TRAIN_IMAGES, np.zeros((10, 4, 4), np.uint8))
    write_idx(d / TRAIN_LABELS, np.arange(10, dtype=np.uint8) % 10)
    train, test = load_dataset(spec("idx:mnist"), roots=(str(tmp_path),))
    assert len(train) + len(test) == 10


# ---------------------------------------------------------------- refused

def test_absolute_path_outside_is_refused_the_same_whether_it_exists_or_not(dirs):
    root, outside = dirs
    roots = (str(root),)
    there = refusal(f"npz:{outside}/secret.npz", roots)
    assert there == outside_message(f"npz:{outside}/secret.npz", (str(root),))
    assert there == (f"data.source npz:{outside}/secret.npz is outside this worker's data roots ({root}); "
                     "start workers with --data-root")
    gone = refusal(f"npz:{outside}/missing.npz", roots)
    assert gone.replace("missing.npz", "secret.npz") == there
    # a directory that does not exist, and one that cannot be read, say the same
    assert refusal("npz:/nonexistent/dir/secret.npz", roots).replace("/nonexistent/dir", str(outside)) == there
    assert refusal("npz:/proc/1/root/secret.npz", roots).replace("/proc/1/root", str(outside)) == there


def test_dot_dot_traversal_is_refused(dirs):
    root, outside = dirs
    for source in (f"npz:{root}/../outside/secret.npz", f"npz:{root}/nothing/../../outside/secret.npz",
                   "npz:../outside/secret.npz"):
        refusal(source, (str(root),))


def test_a_string_prefix_is_not_a_root(tmp_path):
    root, sibling = tmp_path / "data", tmp_path / "data-private"
    root.mkdir()
    sibling.mkdir()
    write_npz(sibling / "x.npz")
    refusal(f"npz:{sibling}/x.npz", (str(root),))
    assert not is_within(str(sibling), str(root)) and is_within(str(root / "x"), str(root))
    assert is_within("/etc/passwd", "/")


@pytest.mark.parametrize("target", ["secret.npz", "missing.npz"])
def test_a_symlink_inside_a_root_pointing_outside_is_refused(dirs, target):
    root, outside = dirs
    (root / "link.npz").symlink_to(outside / target)
    (root / "linkdir").symlink_to(outside)
    text = refusal(f"npz:{root}/link.npz", (str(root),))
    assert target not in text
    refusal(f"npz:{root}/linkdir/secret.npz", (str(root),))
    refusal("npz:link.npz", (str(root),))


def test_relative_and_absolute_paths_are_refused_without_roots(dirs):
    root, _ = dirs
    text = refusal(f"npz:{root}/a.npz", ())
    assert "(none: only sklearn:digits and synthetic:... are built in)" in text
    refusal("npz:a.npz", ())
    refusal(f"idx:{root}", ())


def test_an_idx_file_linked_out_of_the_root_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "mnist").mkdir(parents=True)
    outside.mkdir()
    write_idx(outside / TRAIN_IMAGES, np.zeros((10, 4, 4), np.uint8))
    (root / "mnist" / TRAIN_IMAGES).symlink_to(outside / TRAIN_IMAGES)
    write_idx(root / "mnist" / TRAIN_LABELS, np.zeros(10, np.uint8))
    text = refusal(f"idx:{root}/mnist", (str(root),))
    assert f"({TRAIN_IMAGES}) is outside" in text
    refusal(f"idx:{outside}", (str(root),))


def test_nothing_outside_is_opened_or_stat_ed(dirs, monkeypatch):
    """Only realpath's own lstat of the components may touch an outside path; no exists, stat, open or load."""
    root, outside = dirs
    touched: list[str] = []

    def spy(fn):
        def wrapped(path, *args, **kwargs):
            touched.append(os.fspath(path))
            return fn(path, *args, **kwargs)
        return wrapped

    for mod, name in ((os.path, "exists"), (os.path, "isfile"), (os.path, "isdir"), (os, "stat"),
                      (builtins, "open"), (np, "load")):
        monkeypatch.setattr(mod, name, spy(getattr(mod, name)))
    for name in ("exists", "is_file", "is_dir", "stat", "open", "read_bytes"):
        original = getattr(pathlib.Path, name)
        monkeypatch.setattr(pathlib.Path, name, lambda self, *a, _f=original, **k: (touched.append(str(self)),
                                                                                      _f(self, *a, **k))[1])
    for source in (f"npz:{outside}/secret.npz", f"npz:{root}/../outside/secret.npz", "npz:../outside/secret.npz",
                   f"idx:{outside}"):
        with pytest.raises(DataError):
            load_dataset(spec(source), roots=(str(root),))
    assert not [p for p in touched if str(outside) in p or "secret" in p], touched


# ---------------------------------------------------------------- the worker's side

def test_env_var_parsing():
    sep = os.pathsep
    assert roots_from_env(None) == () and roots_from_env("") == () and roots_from_env(sep) == ()
    assert roots_from_env(f"/data{sep}/mnt/x") == ("/data", "/mnt/x")
    assert roots_from_env(f" /data {sep}{sep}/mnt/x{sep}") == ("/data", "/mnt/x")


def test_check_roots_resolves_and_refuses_what_is_not_a_directory(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("x")
    assert check_roots([str(tmp_path / "d"), f"{tmp_path}/d/../d"]) == (os.path.realpath(tmp_path / "d"),)
    with pytest.raises(ValueError, match=r"data root .*/f: expected a directory"):
        check_roots([str(tmp_path / "d"), str(tmp_path / "f")])
    with pytest.raises(ValueError, match=r"data root .*/none: expected a directory"):
        check_roots([str(tmp_path / "none")])


def test_data_cache_uses_the_worker_roots_and_refuses_with_data_error(dirs):
    """DataError is what Task treats as fatal: the job fails at once, not after --max-failures tries."""
    root, outside = dirs
    assert DataCache().roots == ()
    cache = DataCache(roots=(str(root),))
    train, _ = cache.get(spec(f"npz:{root}/a.npz"), 0)
    assert len(train) == 30
    with pytest.raises(DataError, match="outside this worker's data roots"):
        cache.get(spec(f"npz:{outside}/secret.npz"), 0)
    assert PathGuard("npz:x", None).resolve("~/x").is_absolute()


def test_psctl_worker_refuses_a_root_that_is_not_a_directory(tmp_path):
    result = run_psctl("worker", "--scheduler", "tcp://127.0.0.1:9", "--data-root", str(tmp_path / "none"),
                       timeout=30)
    assert result.returncode != 0 and "expected a directory" in result.stderr


# ---------------------------------------------------------------- real processes

def job_file(tmp_path, name, source) -> str:
    spec_ = {"name": name, "seed": 0, "workers": 1, "steps": 20,
             "model": {"kind": "mlp", "hidden": [16]}, "data": {"source": source, "batch_size": 8},
             "optimizer": {"kind": "sgd", "lr": 0.05}, "consistency": {"policy": "asp"}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec_))
    return str(path)


def test_worker_reads_inside_its_root_and_refuses_outside_at_once(procs, tmp_path, dirs):
    root, outside = dirs
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "state"), "--max-failures", "50")
    addr = sched.ready["addr"]
    procs.server(0, "--scheduler", addr)
    worker = procs.start("worker", "--scheduler", addr, "--data-root", str(root))
    assert worker.ready["data_roots"] == [os.path.realpath(root)]

    ok = run_psctl("submit", job_file(tmp_path, "inside", f"npz:{root}/a.npz"), "--scheduler", addr,
                   "--wait", "--json", timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["status"] == "succeeded"

    for target in ("secret.npz", "missing.npz"):
        source = f"npz:{outside}/{target}"
        bad = run_psctl("submit", job_file(tmp_path, "outside", source), "--scheduler", addr,
                        "--wait", "--json", timeout=120)
        assert bad.returncode == 1
        job = json.loads(bad.stdout)["job"]
        status = run_psctl("status", job, "--scheduler", addr, "--json", timeout=30)
        error = json.loads(status.stdout)["error"]
        # fatal: the worker's sentence itself, not "partition 0 failed 50 times in a row; last error: ..."
        assert error == outside_message(source, (os.path.realpath(root),))
        assert not any(t in status.stdout for t in OS_TEXT), status.stdout
