"""`psctl run`: a whole cluster on this machine for one job, then tear it down.

Starts a scheduler, S servers and W workers as local processes (each in its
own process group, each told to die with this process on Linux), submits
the job, shows the progress bar, prints the summary and stops every process
it started: on success, on failure, and on Ctrl-C.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import click

from protocol.endpoints import READY_PREFIX
from worker.cli.cmd_jobs import _call, job_summary, load_and_check, wait_for
from worker.cli.progress import print_summary

READY_TIMEOUT_S = 60.0
READY = READY_PREFIX.encode()
STOP_TIMEOUT_S = 10.0
# BLAS threads per process: several processes share the cores, and numpy's
# small matrices run slower, not faster, with threads fighting over them.
CHILD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _die_with_parent() -> None:
    """In the child: get SIGTERM when `psctl run` dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    os.setpgrp()  # its own group: Ctrl-C in the terminal reaches us, and we stop it in order


class LocalCluster:
    """The processes of a local cluster; `stop()` ends them all, whatever happened."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, *args: str, module: str = "ps.cli") -> dict:
        """Start `python -m MODULE ARGS` (psctl by default), wait for its READY line, return what it announced."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for key, value in CHILD_ENV.items():
            env.setdefault(key, value)
        log = open(os.path.join(self.log_dir, f"{name}.log"), "wb")
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, stderr=log,
                                stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)
        log.close()
        self.procs.append((name, proc))
        return self._ready(name, proc)

    def _ready(self, name: str, proc: subprocess.Popen) -> dict:
        deadline = time.monotonic() + READY_TIMEOUT_S
        buf = b""
        fd = proc.stdout.fileno()
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            for line in buf.split(b"\n"):
                if line.startswith(READY):
                    return json.loads(line[len(READY):])
        tail = self.log_tail(name)
        raise click.ClickException(f"{name} did not start (see {self.log_dir}/{name}.log): {tail}")

    def boot(self, servers: int, worker_args: list[list[str]]):
        """Start a scheduler, `servers` shards and one worker per entry of `worker_args`.

        Returns (scheduler address, a SchedulerClient to it); the workers
        start only once every shard has registered, so jobs are planned
        over all of them.
        """
        from worker.sched_client import SchedulerClient

        addr = self.start("scheduler", "scheduler", "--state-dir", os.path.join(self.log_dir, "scheduler"))["addr"]
        for k in range(servers):
            self.start(f"server-{k}", "server", "--shard-id", str(k), "--scheduler", addr,
                       "--bind", "tcp://127.0.0.1:0")
        client = SchedulerClient(addr, timeout_s=5.0, retries=2)
        _wait_for_servers(client, servers)
        for i, args in enumerate(worker_args):
            self.start(f"worker-{i}", "worker", "--scheduler", addr, *args)
        return addr, client

    @property
    def pids(self) -> list[int]:
        return [proc.pid for _name, proc in self.procs]

    def log_tail(self, name: str) -> str:
        try:
            with open(os.path.join(self.log_dir, f"{name}.log"), errors="replace") as fh:
                lines = [line.strip() for line in fh if line.strip()]
            return lines[-1] if lines else "no output"
        except OSError:
            return "no log"

    def stop(self) -> None:
        """SIGTERM everyone (workers first), wait, SIGKILL what is left; always reaps."""
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for _name, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs.clear()


@click.command("run")
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--servers", type=click.IntRange(1, 64), default=None,
              help="Server shards to start (default 1, or DMLC_NUM_SERVER).")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Workers to start (default: the job's `workers`, or DMLC_NUM_WORKER).")
@click.option("--device", type=click.Choice(["cpu", "gpu", "auto"]), default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the loss curve to this PNG file.")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the scheduler's state and the logs here (default: a temporary directory, removed).")
def run(job_file, servers, workers, device, as_json, quiet, plot, state_dir):
    """Run JOB_FILE on a local cluster started for it; exits 0 if the job succeeded."""
    from protocol.messages import Submit

    spec = load_and_check(job_file)
    servers = servers or int(os.environ.get("DMLC_NUM_SERVER") or 1)
    workers = workers or int(os.environ.get("DMLC_NUM_WORKER") or spec["workers"])
    keep = state_dir is not None
    state_dir = state_dir or tempfile.mkdtemp(prefix="psctl-run-")
    os.makedirs(state_dir, exist_ok=True)
    cluster = LocalCluster(state_dir)
    status = "failed"
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        addr, client = cluster.boot(servers, [["--device", device]] * workers)
        job = _call(client, Submit(spec=spec, submission_id=uuid.uuid4().hex))["job"]
        if not quiet:
            click.echo(f"local cluster: scheduler {addr}, {servers} server(s), {workers} worker(s); job {job}",
                       err=True)
        body = wait_for(client, job, show=not quiet, plot=plot)
        status = body["state"]
        print_summary(job_summary(body), as_json=as_json)
        client.close()
    except KeyboardInterrupt:
        click.echo("interrupted: stopping the local cluster", err=True)
        status = "interrupted"
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)
        if not keep:
            shutil.rmtree(state_dir, ignore_errors=True)
    if status != "succeeded":
        raise SystemExit(130 if status == "interrupted" else 1)


def _interrupt(signum, frame) -> None:
    """SIGTERM ends `psctl run` the way Ctrl-C does: through the clean-up."""
    raise KeyboardInterrupt


def _wait_for_servers(client, count: int) -> None:
    """Block until `count` shards are registered, so the job is planned over all of them."""
    from protocol.messages import Status

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if len(_call(client, Status())["servers"]) >= count:
            return
        time.sleep(0.1)  # the servers register within a heartbeat
    raise click.ClickException(f"only some of the {count} servers registered with the scheduler in time")
