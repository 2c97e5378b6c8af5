"""The progress bar in a real terminal: tmux, 80 columns, a job that runs ~20 s.

`psctl submit --wait` runs in a detached tmux session of 80x24 on a
private server (`tmux -L NAME`, killed in `finally`); the test waits for
the command to end through `tmux wait-for` (a channel the command signals
as it exits), bounded by the subprocess timeout, then reads the pane. A bar
that wraps or is not redrawn in place leaves several bar lines; the pane
must show the submitted line, exactly one bar line, then the summary.
The tqdm bar itself: worker/views/progress.py.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import uuid

import pytest

from tests.procs import PSCTL
from tests.test_jobs import job_file, start_cluster

COLUMNS, ROWS = 80, 24
# Bounds on a loaded 2-core machine: the whole job, and one tmux command.
JOB_DEADLINE_S = 240.0
TMUX_COMMAND_S = 30.0
# ~20 s of training on two workers here (2 x 3,000 small steps), ~40 redraws of the bar.
STEPS = 3000

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    """A private tmux server (its own socket name) holding one session; `kill()` ends it and everything in it."""

    def __init__(self):
        self.name = f"psctl-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str, timeout: float = TMUX_COMMAND_S) -> str:
        done = subprocess.run(["tmux", "-L", self.name, "-f", "/dev/null", *args], capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"tmux {' '.join(args)}: {done.stderr}"
        return done.stdout

    def pane(self) -> list[str]:
        """The pane's lines, history included, without the blank ones at the end."""
        lines = self("capture-pane", "-p", "-S", "-200", "-t", "t").splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        return lines

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.name, "kill-server"], capture_output=True, timeout=TMUX_COMMAND_S)


def test_the_bar_is_one_line_in_an_80_column_terminal(procs, tmp_path):
    addr = start_cluster(procs, tmp_path)
    path = job_file(tmp_path, name="term", workers=2, steps=STEPS, eval_every=500)
    tmux = Tmux()
    # The command signals the channel as it ends, then holds the pane open (reading the terminal) until kill-server.
    script = (f"{shlex.quote(PSCTL)} submit {shlex.quote(path)} --scheduler {addr} --wait; "
              f"echo EXIT=$?; tmux -L {tmux.name} wait-for -S done; read hold")
    try:
        tmux("new-session", "-d", "-s", "t", "-x", str(COLUMNS), "-y", str(ROWS), "sh", "-c", script)
        assert tmux("display-message", "-p", "-t", "t", "#{pane_width}").strip() == str(COLUMNS)
        tmux("wait-for", "done", timeout=JOB_DEADLINE_S)  # returns once the command has ended
        lines = tmux.pane()
    finally:
        tmux.kill()
    text = "\n".join(lines)
    assert lines[-1] == "EXIT=0", text
    start = next(i for i, line in enumerate(lines) if line.startswith("submitted term-"))
    job = lines[start].split()[1]
    bars = [line for line in lines if line.startswith(job + " ")]
    assert len(bars) == 1, f"{len(bars)} bar lines (a bar that wraps or stacks):\n{text}"
    bar = lines[start + 1]
    assert bar == bars[0] and len(bar) <= COLUMNS, text
    assert f"{2 * STEPS}/{2 * STEPS}" in bar and "loss" in bar, text   # the final state, drawn in place
    summary = [line.split(None, 1) for line in lines[start + 2:-1]]
    assert summary[0] == ["job", job] and summary[1] == ["status", "succeeded"], text
