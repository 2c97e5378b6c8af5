"""`psctl train-local`: the command object in-process, then the installed
console script as a real subprocess, the way a user runs it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ps.cli import updater_factory
from worker.cli.cmd_train import ProgressLine, train_local

MLP_JOB = """\
name: test-digits-mlp
seed: 0
steps: 600
eval_every: 100
model: {kind: mlp, hidden: [256, 128]}
data: {source: "sklearn:digits", batch_size: 64}
optimizer: {kind: momentum, lr: 0.1}
"""

CNN_JOB = """\
name: test-digits-cnn
seed: 0
steps: 400
eval_every: 100
model: {kind: cnn, channels: [16, 32], hidden: [128], batchnorm: true}
data: {source: "sklearn:digits", batch_size: 32}
optimizer: {kind: momentum, lr: 0.05, schedule: {kind: cosine}}
"""

SMALL_JOB = """\
name: small
steps: 20
model: {kind: mlp, hidden: [32]}
data: {source: "sklearn:digits"}
optimizer: {kind: sgd, lr: 0.1}
"""

JSON_FIELDS = {"test_accuracy", "test_loss", "final_loss", "steps", "wall_s", "examples_per_s"}



def invoke_train_local(args):
    """The command as psctl runs it: with the servers' optimizers in the click context."""
    return CliRunner().invoke(train_local, args, obj={"updater_factory": updater_factory})

def write(tmp_path: Path, text: str, name: str = "job.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def psctl() -> str:
    beside = Path(sys.executable).parent / "psctl"
    found = str(beside) if beside.exists() else shutil.which("psctl")
    assert found, "the psctl console script is not installed (make install)"
    return found


def run_psctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # One BLAS thread: on a small shared CI box OpenBLAS's spinning threads
    # can make these tiny matrices 10-20x slower; results are the same.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([psctl(), *args], check=False, capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(out: str, *fragments: str) -> None:
    assert "Traceback" not in out
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0], out


# ---------------------------------------------------------------- in-process (CliRunner)

def test_json_result_in_process(tmp_path):
    res = invoke_train_local([write(tmp_path, SMALL_JOB), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert JSON_FIELDS <= set(data)
    assert data["steps"] == 20 and data["job"] == "small" and data["device"] == "cpu"
    assert 0.0 <= data["test_accuracy"] <= 1.0


def test_steps_override_and_summary_line(tmp_path):
    res = invoke_train_local([write(tmp_path, SMALL_JOB), "--steps", "7"])
    assert res.exit_code == 0, res.output
    assert "small: test accuracy" in res.stdout and "after 7 steps" in res.stdout
    assert "step 7/7" in res.stderr          # progress goes to stderr


def test_steps_override_replaces_epochs(tmp_path):
    text = SMALL_JOB.replace("steps: 20", "epochs: 5")
    res = invoke_train_local([write(tmp_path, text), "--steps", "3", "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"] == 3


@pytest.mark.parametrize("text, fragment", [
    (SMALL_JOB.replace("lr: 0.1", "lr: -1"), "optimizer.lr: expected a number > 0, found -1"),
    (SMALL_JOB.replace("kind: mlp", "kind: rnn"), "model.kind: expected one of mlp, cnn"),
    ("model: [unclosed", "valid YAML"),
    (SMALL_JOB.replace('"sklearn:digits"', '"npz:/nonexistent/x.npz"'), "expected a .npz file, found no such file"),
    (SMALL_JOB.replace('"sklearn:digits"', '"synthetic:n=100,colour=red"'), "expected a key among n, test"),
    (SMALL_JOB.replace("kind: mlp", "kind: cnn").replace('"sklearn:digits"', '"synthetic:n=100"'),
     "a cnn needs image input"),
])
def test_bad_job_is_one_sentence(tmp_path, text, fragment):
    res = invoke_train_local([write(tmp_path, text)])
    assert res.exit_code == 1
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert_one_line_error(res.output, fragment)


def test_missing_file_in_process(tmp_path):
    res = invoke_train_local([str(tmp_path / "nope.yaml")])
    assert res.exit_code == 1
    assert_one_line_error(res.output, "nope.yaml", "no such file")


def test_gpu_without_cupy_is_one_sentence(tmp_path):
    try:
        import cupy  # noqa: F401
        pytest.skip("cupy is installed here")
    except ImportError:
        pass
    res = invoke_train_local([write(tmp_path, SMALL_JOB), "--device", "gpu"])
    assert res.exit_code == 1
    assert_one_line_error(res.output, "--device gpu needs cupy")


def test_diverged_run_exits_non_zero(tmp_path, monkeypatch):
    import worker.trainer as trainer_mod

    original = trainer_mod.LocalTrainer._step

    def poisoned(self, t):
        loss, acc, k = original(self, t)
        return (float("nan") if t == 2 else loss), acc, k

    monkeypatch.setattr(trainer_mod.LocalTrainer, "_step", poisoned)
    res = invoke_train_local([write(tmp_path, SMALL_JOB), "--json", "-q"])
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    assert data["stopped"] == "diverged" and data["final_loss"] is None and data["steps"] == 3
    assert "training diverged at step 3" in res.stderr


class FakeStream:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def row(step, **extra):
    return {"step": step, "loss": 1.0 / step, "accuracy": 0.5, "examples_per_s": 1000.0, "wall_s": step / 10, **extra}


def test_progress_line_logs_every_tenth_without_a_tty():
    out = FakeStream(tty=False)
    bar = ProgressLine(200, stream=out)
    for s in range(1, 201):
        bar(row(s, **({"test_accuracy": 0.9} if s == 100 else {})))
    bar.close()
    lines = out.text.splitlines()
    assert len(lines) == 11 and "\r" not in out.text      # step 1, then every 20 steps
    assert lines[0].startswith("step 1/200") and lines[-1].startswith("step 200/200")
    assert "test 0.9000" in lines[-1] and "1,000 ex/s" in lines[-1]


def test_progress_line_redraws_in_place_on_a_tty():
    out = FakeStream(tty=True)
    bar = ProgressLine(3, stream=out)
    for s in (1, 2, 3):
        bar(row(s))
    bar.close()
    assert out.text.startswith("\rstep 1/3") and out.text.endswith("\n")
    assert out.text.count("\n") == 1 and "step 3/3" in out.text


# ---------------------------------------------------------------- the installed command

@pytest.mark.parametrize("text", [MLP_JOB, CNN_JOB], ids=["mlp", "cnn"])
def test_psctl_train_local_reaches_97_percent_on_digits(tmp_path, text):
    proc = run_psctl("train-local", write(tmp_path, text), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert JSON_FIELDS <= set(data)
    assert data["test_accuracy"] >= 0.97, data
    assert data["steps"] in (400, 600) and data["wall_s"] > 0 and data["examples_per_s"] > 0
    assert "step 1/" in proc.stderr            # progress on stderr, not mixed into the JSON


def test_psctl_train_local_bad_and_missing_files(tmp_path):
    typo = SMALL_JOB.replace('data: {source: "sklearn:digits"}', 'data: {source: "sklearn:digits", batch_sise: 3}')
    bad = run_psctl("train-local", write(tmp_path, typo))
    assert bad.returncode != 0
    assert_one_line_error(bad.stderr, "data.batch_sise: unknown field")
    missing = run_psctl("train-local", str(tmp_path / "absent.yaml"))
    assert missing.returncode != 0
    assert_one_line_error(missing.stderr, "absent.yaml", "no such file")
    assert missing.stdout == ""


# ---------------------------------------------------------------- the example jobs

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"


@pytest.mark.parametrize("name", ["digits-mlp.yaml", "digits-cnn.yaml"])
def test_example_jobs_validate_and_run(name):
    from protocol.jobspec import load_job_file

    spec = load_job_file(str(EXAMPLES / name))
    assert spec["workers"] == 2 and spec["consistency"]["policy"] == "asp"
    assert spec["data"]["source"] == "sklearn:digits"
    res = invoke_train_local([str(EXAMPLES / name), "--steps", "3", "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"] == 3
