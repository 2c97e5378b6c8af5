"""Starting and reaping real `psctl` processes in tests.

A daemon announces itself with one `READY {json}` line on stdout; tests
wait for that line (with a timeout), never for a sleep. Every process a
test starts is killed and reaped when the test ends, pass or fail.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PSCTL = str(Path(sys.executable).parent / "psctl")
READY_TIMEOUT_S = 30.0
# Several processes share 2 cores in these tests; threaded BLAS on small
# matrices only makes them fight (see worker/cli/cmd_run.py).
QUIET_BLAS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for key, value in QUIET_BLAS.items():
        env.setdefault(key, value)
    env.update(extra or {})
    return env


class Proc:
    """One child process with its stdout read line by line (bounded waits)."""

    def __init__(self, args: list[str], *, env: dict | None = None, cwd: str | None = None):
        self.args = args
        self.stderr_file = tempfile.NamedTemporaryFile(prefix="psctl-", suffix=".log", delete=False)
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self.stderr_file, env=child_env(env), cwd=cwd,
            start_new_session=True,  # its own process group: we can signal it and its children
        )
        self._buf = b""
        self.lines: list[str] = []
        self.ready: dict | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def readline(self, timeout: float) -> str | None:
        """The next stdout line, or None at EOF or timeout."""
        deadline = time.monotonic() + timeout
        fd = self.popen.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._buf += chunk
        if b"\n" not in self._buf:
            line, self._buf = self._buf, b""
            return line.decode(errors="replace") if line else None
        line, self._buf = self._buf.split(b"\n", 1)
        text = line.decode(errors="replace")
        self.lines.append(text)
        return text

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict:
        """Block until the READY line; raise with the process's stderr if it never comes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.readline(deadline - time.monotonic())
            if line is None:
                break
            if line.startswith("READY "):
                self.ready = json.loads(line[6:])
                return self.ready
        raise AssertionError(f"{' '.join(self.args)} not ready within {timeout}s "
                             f"(exit={self.popen.poll()}):\n{self.stderr()}")

    def read_rest(self, timeout: float) -> str:
        """Everything left on stdout until EOF (or timeout)."""
        out = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.readline(deadline - time.monotonic())
            if line is None:
                break
            out.append(line)
        return "\n".join(out)

    def stderr(self) -> str:
        return Path(self.stderr_file.name).read_text(errors="replace")[-8000:]

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the process group and reap it."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL; always reaps."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        self.kill()
        self.popen.stdout.close()
        self.stderr_file.close()
        os.unlink(self.stderr_file.name)


class ProcGroup:
    """Every process a test started; `reap()` stops them all."""

    def __init__(self):
        self.procs: list[Proc] = []

    def start(self, *args: str, env: dict | None = None, ready: bool = True, cwd: str | None = None,
              timeout: float = READY_TIMEOUT_S) -> Proc:
        proc = Proc([PSCTL, *args], env=env, cwd=cwd)
        self.procs.append(proc)
        if ready:
            proc.wait_ready(timeout)
        return proc

    def server(self, shard_id: int, *extra: str, env: dict | None = None) -> Proc:
        return self.start("server", "--bind", "tcp://127.0.0.1:0", "--shard-id", str(shard_id), *extra, env=env)

    def reap(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.procs.clear()


def run_psctl(*args: str, timeout: float = 120.0, env: dict | None = None,
              input: str | None = None) -> subprocess.CompletedProcess:
    """Run one psctl command to completion (bounded), capturing its output."""
    return subprocess.run([PSCTL, *args], capture_output=True, text=True, timeout=timeout, env=child_env(env),
                          input=input)
