"""Daemons as local child processes: started, awaited, stopped, always reaped.

`Child` is one process (a `psctl` daemon, usually) in its own process
group, so a signal reaches it and whatever it started; its stdout is read
line by line with bounded waits, and `wait_ready` returns the facts of its
`READY {json}` line (protocol/endpoints.py) or raises `NotReady`. `stop()`
sends SIGTERM to the group, waits, then SIGKILL, and reaps it whatever
happened. `LocalCluster` is the processes of a cluster on this machine (a
scheduler, shards, workers, or any module that announces itself the same
way) with their logs in one directory; `psctl run`, the benchmarks and the
tests' process helpers (tests/procs.py) all start their children here.

BLAS threads: every child starts with one (QUIET_BLAS, unless this
process's environment says otherwise); `boot` then gives each worker
`worker_threads(workers)` (cores // workers) through `psctl worker --threads-per-worker`,
which resizes the worker's own BLAS pool once numpy is loaded (setting the
variables after that would change nothing). Shards and the scheduler keep
one: their work is memory-bound copies and element-wise updates.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO

from protocol.endpoints import READY_PREFIX

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
# BLAS threads of every child at start: several processes share the cores, and
# numpy's small matrices run slower, not faster, with threads fighting over
# them. Workers, whose matmuls are the compute, get theirs from `boot`.
QUIET_BLAS = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def worker_threads(workers: int, cores: int | None = None) -> int:
    """BLAS threads per worker when `workers` share this machine's `cores` (default: os.cpu_count()): at least one."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers))


class NotReady(RuntimeError):
    """A child exited, or was silent past its timeout, before its READY line."""


class ClusterError(RuntimeError):
    """A local cluster could not be started (the message says which process and where its log is)."""


def child_env(extra: dict | None = None) -> dict:
    """This process's environment, unbuffered, one BLAS thread unless set, plus `extra`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for key, value in QUIET_BLAS.items():
        env.setdefault(key, value)
    env.update(extra or {})
    return env


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _as_foreground() -> None:
    """In the child: Ctrl-C's default action, as an interactive shell gives the command it runs in the
    foreground (a parent started in the background, by a non-interactive shell, has SIGINT ignored,
    and an ignored signal stays ignored across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Child:
    """One child process in its own process group, its stdout read line by line (bounded waits).

    `stderr` is a file (or subprocess constant) the child writes its log to.
    With `die_with_parent` it gets SIGTERM when this process dies (Linux).
    With `foreground` it takes SIGINT as a command typed at a terminal does (tests of Ctrl-C).
    """

    def __init__(self, args: list[str], *, stderr: IO | int | None = None, env: dict | None = None,
                 cwd: str | None = None, die_with_parent: bool = False, foreground: bool = False):
        self.args = list(args)
        steps = ([_die_with_parent] if die_with_parent else []) + ([_as_foreground] if foreground else [])
        self.popen = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=child_env(env),
            cwd=cwd, start_new_session=True,  # its own group: we signal it and its children, Ctrl-C does not
            preexec_fn=(lambda: [step() for step in steps]) if steps else None)
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
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
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
        """Block until the READY line and return its facts; NotReady if it exits or times out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.readline(deadline - time.monotonic())
            if line is None:
                break
            if line.startswith(READY_PREFIX):
                self.ready = json.loads(line[len(READY_PREFIX):])
                return self.ready
        code = self.popen.poll()
        raise NotReady(f"{' '.join(self.args)} " + (f"exited with {code} before it was ready" if code is not None
                                                    else f"not ready within {timeout:g}s"))

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

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def signal(self, sig: int) -> None:
        """Send `sig` to the child's process group (nothing once it is reaped)."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the process group and reap it."""
        self.signal(signal.SIGKILL)
        try:
            self.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # unkillable (stuck in the kernel): nothing more we can do
            pass

    def reap(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Wait up to `timeout` for the child to exit, then SIGKILL its group; reaps and closes its stdout."""
        try:
            self.popen.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            pass
        self.kill()
        if self.popen.stdout is not None:
            self.popen.stdout.close()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait, then SIGKILL; always reaps."""
        self.signal(signal.SIGTERM)
        self.reap(timeout)


class LocalCluster:
    """The processes of a local cluster, their logs in `log_dir`; `stop()` ends them all, whatever happened."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.children: list[tuple[str, Child]] = []

    def start(self, name: str, *args: str, module: str = "ps.cli", timeout: float = READY_TIMEOUT_S) -> dict:
        """Start `python -m MODULE ARGS` (psctl by default), wait for its READY line, return what it announced.

        Raises ClusterError (naming its log) if it exits or stays silent past `timeout`.
        """
        with open(os.path.join(self.log_dir, f"{name}.log"), "wb") as log:
            child = Child([sys.executable, "-m", module, *args], stderr=log, die_with_parent=True)
        self.children.append((name, child))
        try:
            return child.wait_ready(timeout)
        except NotReady:
            raise ClusterError(f"{name} did not start (see {self.log_dir}/{name}.log): "
                               f"{self.log_tail(name)}") from None

    def boot(self, servers: int, worker_args: list[list[str]], *, curve_dir: str | None = None,
             threads_per_worker: int | None = None, server_args: Sequence[str] = (),
             scheduler_args: Sequence[str] = ()):
        """Start a scheduler, `servers` shards and one worker per entry of `worker_args`.

        With `curve_dir` (see make_keys) every daemon runs with CURVE and
        the returned client holds the admin key. Each worker gets
        `threads_per_worker` BLAS threads (default: worker_threads(number of
        workers)) unless its own entry of `worker_args` says otherwise;
        `server_args` and `scheduler_args` are added to every shard's and
        the scheduler's command line (their limits: --max-message-bytes,
        --max-model-bytes, ...). Returns (scheduler address, a
        SchedulerClient to it); the workers start only once every shard has
        registered, so jobs are planned over all of them.
        """
        from worker.client import CurveKeys
        from worker.sched_client import SchedulerClient

        curve = ["--curve-dir", curve_dir] if curve_dir else []
        addr = self.start("scheduler", "scheduler", "--state-dir", os.path.join(self.log_dir, "scheduler"),
                          *curve, *scheduler_args)["addr"]
        for k in range(servers):
            self.start(f"server-{k}", "server", "--shard-id", str(k), "--scheduler", addr,
                       "--bind", "tcp://127.0.0.1:0", *curve, *server_args)
        keys = None
        if curve_dir:
            admin = CurveKeys.load(curve_dir, "admin")
            keys = admin.to(admin.scheduler)
        client = SchedulerClient(addr, timeout_s=5.0, retries=2, keys=keys)
        threads = threads_per_worker or worker_threads(len(worker_args))
        try:
            _wait_for_servers(client, servers)
            for i, args in enumerate(worker_args):
                # The worker's own args come last: for a repeated option, click keeps the last one.
                self.start(f"worker-{i}", "worker", "--scheduler", addr, *curve,
                           "--threads-per-worker", str(threads), *args)
        except BaseException:
            client.close()
            raise
        return addr, client

    def pid_of(self, name: str) -> int:
        """The pid of the child started as `name` (KeyError if there is none)."""
        for child_name, child in self.children:
            if child_name == name:
                return child.pid
        raise KeyError(name)

    def ready_of(self, name: str) -> dict:
        """What the child started as `name` announced in its READY line (KeyError if there is none)."""
        for child_name, child in self.children:
            if child_name == name:
                return dict(child.ready or {})
        raise KeyError(name)

    def make_keys(self, directory: str) -> str:
        """One CURVE key per role (scheduler, server, worker, admin) in `directory`, made by `psctl keys generate`.

        Returns `directory`, for boot(curve_dir=...).
        """
        for role in ("scheduler", "server", "worker", "admin"):
            done = subprocess.run([sys.executable, "-m", "ps.cli", "keys", "generate", directory, "--role", role],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env(),
                                  timeout=READY_TIMEOUT_S)
            if done.returncode != 0:
                raise ClusterError(f"cannot make the {role} key in {directory}: "
                                   f"{done.stderr.decode(errors='replace').strip()}")
        return directory

    @property
    def pids(self) -> list[int]:
        return [child.pid for _name, child in self.children]

    def log_tail(self, name: str) -> str:
        """The last non-empty line of a child's log."""
        try:
            with open(os.path.join(self.log_dir, f"{name}.log"), errors="replace") as fh:
                lines = [line.strip() for line in fh if line.strip()]
            return lines[-1] if lines else "no output"
        except OSError:
            return "no log"

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM everyone (workers first), wait up to `timeout` in all, SIGKILL what is left; always reaps."""
        for _name, child in reversed(self.children):
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _name, child in self.children:
            child.reap(max(0.1, deadline - time.monotonic()))
        self.children.clear()


def request(client, msg) -> dict:
    """One scheduler request's body; a refusal or silence becomes a ClusterError with its sentence."""
    from worker.sched_client import SchedulerError, SchedulerUnavailable

    try:
        return client.request(msg).body
    except SchedulerError as exc:
        raise ClusterError(exc.reason) from None
    except SchedulerUnavailable as exc:
        raise ClusterError(str(exc)) from None


def _wait_for_servers(client, count: int, timeout: float = READY_TIMEOUT_S) -> None:
    """Block until `count` shards are registered, so a job is planned over all of them."""
    from protocol.messages import Status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(request(client, Status())["servers"]) >= count:
            return
        time.sleep(0.1)  # the servers register within a heartbeat
    raise ClusterError(f"only some of the {count} servers registered with the scheduler in time")
