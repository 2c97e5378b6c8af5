"""psctl's edges: re-attaching, interrupts, exit codes, job files on stdin, wrong addresses, did-you-mean,
README's table of job-file fields, and the progress bar's width and quiet modes.

Exit codes (README.md, "Exit codes"; worker/cli/common.py): 0 success, 1 a job
or command failed, 2 a usage error, 130 Ctrl-C, 143 SIGTERM. Processes are
real `psctl` commands on loopback; the cluster tests share one cluster per
module (a scheduler, a server and two workers, reaped at the end).
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from protocol.jobspec import SpecError, defaults_table, validate_job
from tests.procs import PSCTL, ProcGroup, run_psctl
from tests.test_jobs import BASE_JOB, job_file, start_cluster, status, wait_until
from tests.test_run_local import processes_mentioning, scheduler_addr, write_job
from worker.local_cluster import Child
from worker.views.progress import DEFAULT_COLUMNS, MIN_BAR_CELLS, ProgressBar

README = Path(__file__).resolve().parent.parent / "README.md"
WAIT_S = 120.0
# From the signal to the exit of an interrupted `psctl submit --wait` or `psctl wait`, on a loaded machine.
EXIT_AFTER_SIGNAL_S = 30.0
# Generous bounds on a command that must fail fast (the client timeout is 5 s): a loaded 2-core machine.
FAST_S = 30.0
NOWHERE = "tcp://127.0.0.1:1"   # nothing listens on port 1


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler, one server and two workers for the whole module: their address."""
    group = ProcGroup()
    try:
        yield start_cluster(group, tmp_path_factory.mktemp("cluster"))
    finally:
        group.reap()


def follow_output(proc: Child, until: str, deadline: float) -> str:
    """Read `proc`'s output until a line contains `until`; that line (AssertionError with the output if never)."""
    while True:
        line = proc.readline(max(0.0, deadline - time.monotonic()))
        assert line is not None, f"no {until!r} (exit={proc.popen.poll()}):\n" + "\n".join(proc.lines)
        if until in line:
            return line


# --- re-attaching and interrupts ---------------------------------------------------------------------------------

def test_wait_reattaches_and_summarises_a_finished_job(cluster, tmp_path):
    job = run_psctl("submit", job_file(tmp_path, name="later", workers=2, steps=60), "--scheduler", cluster)
    assert job.returncode == 0, job.stderr
    job = job.stdout.strip()
    attached = run_psctl("wait", job, "--scheduler", cluster, "--json", timeout=WAIT_S)
    assert attached.returncode == 0, attached.stderr
    summary = json.loads(attached.stdout)
    assert summary["job"] == job and summary["status"] == "succeeded" and summary["steps_done"] == 120
    again = run_psctl("wait", job, "--scheduler", cluster, timeout=WAIT_S)   # over already: the summary at once
    assert again.returncode == 0, again.stderr
    assert re.search(rf"^\s+job\s+{job}$", again.stdout, re.M) and re.search(r"^\s+status\s+succeeded$",
                                                                           again.stdout, re.M)
    assert job not in again.stderr   # no bar for a job that was over at the first look
    unknown = run_psctl("wait", "nobody-7", "--scheduler", cluster)
    assert unknown.returncode == 1 and "nobody-7" in one_line_error(unknown)


@pytest.mark.parametrize("command, sig, code", [("submit", signal.SIGINT, 130), ("wait", signal.SIGTERM, 143)])
def test_an_interrupted_wait_leaves_the_job_running_and_says_so(cluster, tmp_path, command, sig, code):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) or SIGTERM stops the waiting, not the job."""
    path = job_file(tmp_path, name=f"long-{command}", workers=2, steps=1_000_000)
    job = None
    deadline = time.monotonic() + WAIT_S
    if command == "wait":
        job = run_psctl("submit", path, "--scheduler", cluster).stdout.strip()
        args = ["wait", job]
    else:
        args = ["submit", path, "--wait"]
    proc = Child([PSCTL, *args, "--scheduler", cluster], stderr=subprocess.STDOUT, foreground=True)
    try:
        if job is None:
            job = follow_output(proc, "submitted ", deadline).split()[1]
        wait_until(lambda: (status(cluster, job).get("progress") or {}).get("steps_done", 0) > 10,
                   what="the long job training")
        follow_output(proc, "steps", deadline)  # the waiting command has shown progress: it is in its loop
        proc.signal(sig)
        # its own bound: a slow start above must not leave the exit no time (it is what is tested)
        after = time.monotonic() + EXIT_AFTER_SIGNAL_S
        rest = proc.read_rest(EXIT_AFTER_SIGNAL_S)
        exit_code = proc.wait(max(0.0, after - time.monotonic()))
        assert exit_code == code, "\n".join(proc.lines)
        said = [line for line in rest.splitlines() if f"psctl wait {job}" in line]
        assert len(said) == 1 and f"psctl cancel {job}" in said[0] and "goes on" in said[0], rest
        assert "Aborted" not in rest and "Traceback" not in rest, rest
        assert status(cluster, job)["state"] == "running"
    finally:
        proc.stop()
        if job:
            run_psctl("cancel", job, "--scheduler", cluster)
    cancelled = run_psctl("wait", job, "--scheduler", cluster, "--json")
    assert cancelled.returncode == 1 and json.loads(cancelled.stdout)["status"] == "cancelled"


def test_sigterm_stops_psctl_run_with_143_and_leaves_nothing(tmp_path):
    state = tmp_path / "state"
    deadline = time.monotonic() + 150.0
    proc = Child([PSCTL, "run", write_job(tmp_path, steps=1_000_000), "--state-dir", str(state)],
                 stderr=subprocess.STDOUT)
    try:
        addr = scheduler_addr(follow_output(proc, "local cluster:", deadline))
        assert len(processes_mentioning(addr)) == 3
        proc.popen.send_signal(signal.SIGTERM)   # to psctl alone, as a service manager or `kill` sends it
        code = proc.wait(max(0.0, deadline - time.monotonic()))
    finally:
        proc.stop()
    assert code == 143, "\n".join(proc.lines)
    assert processes_mentioning(str(state), addr) == []


# --- job files ------------------------------------------------------------------------------------------------------

def test_submit_reads_the_job_file_from_stdin(cluster):
    text = yaml.safe_dump({**BASE_JOB, "name": "piped", "workers": 1, "steps": 20})
    result = run_psctl("submit", "-", "--scheduler", cluster, "--wait", "--json", input=text, timeout=WAIT_S)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["job"].startswith("piped-") and summary["status"] == "succeeded"
    typo = run_psctl("submit", "-", "--scheduler", cluster, input=text.replace("batch_size", "batch_sise"))
    assert typo.returncode == 2
    one_line_error(typo, "data.batch_sise: unknown field (did you mean batch_size?")


@pytest.mark.parametrize("change, fragment", [
    ({"data": {"source": "sklearn:digits", "batch_sise": 32}},
     "data.batch_sise: unknown field (did you mean batch_size? known fields here: source, batch_size"),
    ({"stpes": 10}, "stpes: unknown field (did you mean steps?"),
    ({"model": {"kind": "mpl"}}, "model.kind: expected one of mlp, cnn, found 'mpl' (did you mean mlp?)"),
    ({"optimizer": {"kind": "adamw"}}, "found 'adamw' (did you mean adam?)"),
    ({"consistency": {"policy": "bps"}}, "(did you mean bsp?)"),
    ({"colour": "red"}, "colour: unknown field (known fields here: name,"),   # nothing close: no guess
])
def test_a_typo_gets_the_closest_name_in_one_sentence(tmp_path, change, fragment):
    path = tmp_path / "typo.yaml"
    spec = {**BASE_JOB, **change}
    if "stpes" in change:
        spec.pop("steps")
    path.write_text(yaml.safe_dump(spec))
    result = run_psctl("submit", str(path), "--scheduler", NOWHERE, timeout=FAST_S)
    assert result.returncode == 2
    line = one_line_error(result, fragment)
    assert "did you mean" not in line or line.count("did you mean") == 1


def test_readme_lists_every_field_as_the_schema_has_it():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- defaults:begin -->\n(.*?)<!-- defaults:end -->", text, re.S)
    assert block, "README.md has no <!-- defaults:begin --> ... <!-- defaults:end --> block"
    assert block.group(1) == defaults_table(), "README table drifted: paste `make readme-defaults` in"
    printed = subprocess.run([str(Path(PSCTL).parent / "python"), "-m", "protocol.jobspec", "--markdown"],
                             capture_output=True, text=True, timeout=FAST_S)
    assert printed.returncode == 0 and printed.stdout == defaults_table()


def test_the_table_says_which_fields_are_required_and_the_real_defaults():
    rows = {row.split("|")[1].strip(" `"): row.split("|")[2].strip() for row in defaults_table().splitlines()[2:]}
    assert rows["name"] == "`job`" and rows["workers"] == "`1`" and rows["steps"] == "`null`"
    assert rows["model.kind"] == rows["data.source"] == "*required*"
    with pytest.raises(SpecError, match="model.kind: expected a value"):
        validate_job({"model": {}, "data": {"source": "sklearn:digits"}, "steps": 1})
    assert validate_job({"model": {"kind": "mlp"}, "data": {"source": "sklearn:digits"}, "steps": 1})["name"] == "job"


# --- usage errors and addresses ------------------------------------------------------------------------------------

def test_plot_without_wait_is_a_usage_error(tmp_path):
    result = run_psctl("submit", job_file(tmp_path), "--plot", str(tmp_path / "x.png"), "--scheduler", NOWHERE,
                       timeout=FAST_S)
    assert result.returncode == 2
    one_line_error(result, "--plot needs --wait")


def test_an_unresolvable_host_is_said_at_once(tmp_path):
    result = run_psctl("status", "--scheduler", "tcp://no-such-host.invalid:5555", timeout=FAST_S)
    assert result.returncode == 2
    one_line_error(result, "cannot resolve host no-such-host.invalid")


def test_nothing_listening_is_said_within_the_client_timeout(tmp_path):
    result = run_psctl("status", "--scheduler", NOWHERE, "--timeout", "1", timeout=FAST_S)
    assert result.returncode == 1
    one_line_error(result, f"no answer from the scheduler at {NOWHERE}", "within 1s",
                   "the host resolved to 127.0.0.1; is the scheduler running?")
    default = run_psctl("list", "--scheduler", NOWHERE, timeout=FAST_S)  # one client timeout, not one per retry
    assert default.returncode == 1
    one_line_error(default, "within 5s (the host resolved")
    unsent = run_psctl("submit", job_file(tmp_path), "--scheduler", NOWHERE, "--timeout", "1", timeout=FAST_S)
    assert unsent.returncode == 1   # it may have arrived: the way to try again names the id it was sent with
    assert re.search(r"without risking a second job, add --submission-id [0-9a-f]{32}$", one_line_error(unsent))


@pytest.mark.parametrize("args, code, fragment", [
    (["status", "--scheduler", "nowhere"], 2, "is not an address like tcp://127.0.0.1:5555"),
    (["submit", "absent.yaml", "--scheduler", NOWHERE], 2, "absent.yaml"),
    (["submit", "absent.yaml"], 2, "no scheduler address"),
    (["status", "--scheduler", NOWHERE, "--timeout", "0"], 2, "--timeout"),
])
def test_usage_errors_exit_2(args, code, fragment):
    result = run_psctl(*args, timeout=FAST_S, env={"PSCLUSTER_SCHEDULER": "", "DMLC_PS_ROOT_URI": ""})
    assert result.returncode == code, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr


# --- the progress bar, on streams that are not a terminal -----------------------------------------------------------

class Stream:
    """A stream for the bar: a terminal or not, its text kept."""

    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""
        self.encoding = "utf-8"

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def progress_row(done: int, asked: int = 1000) -> dict:
    return {"steps_done": done, "steps_asked": asked, "partitions": 2, "loss": 1.0 / (1 + done), "accuracy": 0.5,
            "test_accuracy": None, "examples_per_s": 12345.0,
            "slowest": {"partition": 1, "steps_done": done // 2, "steps": asked // 2}}


@pytest.mark.parametrize("width", [20, 40, 60, 79, 80, 100, 132, 200])
def test_the_bar_fits_any_width(width):
    bar = ProgressBar(Stream(tty=True), label="digits-mlp-12")
    for done in (0, 500, 1000):
        left, right = bar.fit(progress_row(done), width)
        assert len(left) + MIN_BAR_CELLS + len(right) <= width and f"{done}/1000" in right
    wide_left, wide_right = bar.fit(progress_row(500), 200)
    assert "digits-mlp-12" in wide_left and all(f in wide_right for f in ("loss", "acc", "ex/s", "slowest p1"))


def test_the_terminal_bar_is_redrawn_in_place_and_closed_before_what_follows():
    stream = Stream(tty=True)
    bar = ProgressBar(stream, label="job-1")
    for done in range(0, 1001, 50):
        bar.update(progress_row(done))
    bar.close()
    stream.write("summary\n")
    drawn = stream.text.split("\n")
    assert drawn[-2:] == ["summary", ""] and len(drawn) == 3, stream.text   # one bar line, ended, then the summary
    assert "\r" in drawn[0] and all(len(part) < DEFAULT_COLUMNS for part in drawn[0].split("\r"))
    assert "1000/1000" in drawn[0].split("\r")[-1]


def test_without_a_terminal_the_bar_prints_a_few_plain_lines_ending_with_the_last_state():
    stream = Stream(tty=False)
    bar = ProgressBar(stream, label="job-1")
    for done in range(0, 998):
        bar.update(progress_row(done))
    bar.close()
    lines = stream.text.splitlines()
    assert "\r" not in stream.text and "|" not in stream.text and 2 <= len(lines) <= 12, stream.text
    assert lines[-1].startswith("job-1  997/1000 steps") and "loss" in lines[-1] and "12,345 ex/s" in lines[-1]


def test_a_narrower_terminal_gets_a_narrower_line_without_padding_that_wraps(monkeypatch):
    stream = Stream(tty=True)   # no file descriptor: the width comes from COLUMNS
    bar = ProgressBar(stream, label="job-1")
    monkeypatch.setenv("COLUMNS", "120")
    bar.update(progress_row(100))
    monkeypatch.setenv("COLUMNS", "50")
    bar.update(progress_row(200))
    bar.close()
    drawn = stream.text.rstrip("\n").split("\r")
    wide = [len(line) for line in drawn if "100/1000" in line]
    narrow = [len(line) for line in drawn if "200/1000" in line]
    assert wide and set(wide) == {119} and narrow and max(narrow) <= 49, drawn   # no spaces padded to 119
