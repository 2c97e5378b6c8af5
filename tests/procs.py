"""Starting and reaping real `psctl` processes in tests.

A daemon announces itself with one `READY {json}` line on stdout; tests
wait for that line (with a timeout), never for a sleep. Every process a
test starts is killed and reaped when the test ends, pass or fail. The
process handling itself is worker/local_cluster.py's (what `psctl run` and
the benchmarks use); this adds the test's view: stderr kept in a file, a
failed start as an AssertionError that shows it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from worker.local_cluster import Child, NotReady, child_env

__all__ = ["PSCTL", "Proc", "ProcGroup", "child_env", "run_psctl"]

PSCTL = str(Path(sys.executable).parent / "psctl")
READY_TIMEOUT_S = 30.0


class Proc(Child):
    """One child process (its own process group) with its stdout read line by line and its stderr in a file."""

    def __init__(self, args: list[str], *, env: dict | None = None, cwd: str | None = None):
        self.stderr_file = tempfile.NamedTemporaryFile(prefix="psctl-", suffix=".log", delete=False)
        try:
            super().__init__(args, stderr=self.stderr_file, env=env, cwd=cwd)
        except BaseException:
            self._remove_log()
            raise

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict:
        """Block until the READY line; raise with the process's stderr if it never comes."""
        try:
            return super().wait_ready(timeout)
        except NotReady as exc:
            raise AssertionError(f"{exc} (exit={self.popen.poll()}):\n{self.stderr()}") from None

    def stderr(self) -> str:
        return Path(self.stderr_file.name).read_text(errors="replace")[-8000:]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL; always reaps; removes the stderr file."""
        try:
            super().stop(timeout)
        finally:
            self._remove_log()

    def _remove_log(self) -> None:
        self.stderr_file.close()
        try:
            os.unlink(self.stderr_file.name)
        except FileNotFoundError:
            pass


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


def record_started(monkeypatch, module) -> list[int]:
    """The pids of every child that `module`'s LocalCluster starts, recorded as it starts them
    (a benchmark's processes, to check afterwards that none is left)."""
    pids: list[int] = []

    class Recording(module.LocalCluster):
        def start(self, name, *args, **kwargs):
            try:
                return super().start(name, *args, **kwargs)
            finally:
                pids.extend(p for p in self.pids if p not in pids)

    monkeypatch.setattr(module, "LocalCluster", Recording)
    return pids
