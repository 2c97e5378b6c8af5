"""`psctl run`: a whole cluster on this machine for one job, then tear it down.

Starts a scheduler, S servers and W workers as local processes
(worker/local_cluster.py: each in its own process group, each told to die
with this process on Linux), submits the job, shows the progress bar,
prints the summary and stops every process it started: on success, on
failure, and on Ctrl-C or SIGTERM (then it exits 130 or 143: the job dies
with its cluster). Its workers are workers like any other:
they read a job's idx:/npz: data only under the `--data-root` directories
given here (or PSCLUSTER_DATA_ROOTS, which they inherit); see
worker/data/roots.py.

Each worker gets `--threads-per-worker` BLAS threads, by default this
machine's cores divided among the workers (worker/local_cluster.py,
`worker_threads`); the shards and the scheduler keep one. The servers'
and the scheduler's limits (`--max-message-bytes`, `--max-table-bytes`,
`--max-model-bytes`) are passed to them as given, and left at their own
defaults otherwise (ps/cli/cmd_server.py, ps/cli/cmd_scheduler.py).
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import uuid

import click

from protocol.endpoints import parse_size
from protocol.jobstate import JobState
from worker.cli.cmd_jobs import _call, load_and_check, wait_for
from worker.cli.cmd_worker import threads_option
from worker.cli.common import EXIT_FAILED, BadInput, Terminated, interrupt_exit_code
from worker.views.report import job_summary, print_summary


def _size_or_none(ctx, param, value):
    """click callback: a byte count (4096, 4KiB, 1GiB), None when the option is not given (else one sentence)."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise BadInput(f"{param.opts[0]} {exc}") from None


@click.command("run")
@click.argument("job_file", type=click.Path(dir_okay=False, allow_dash=True))
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
@click.option("--data-root", "data_roots", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Passed to every worker: a directory the job's idx:/npz: data may be read from (repeatable; "
                   "without it the workers use PSCLUSTER_DATA_ROOTS, else only the built-in sources).")
@click.option("--curve", is_flag=True,
              help="Run every daemon with CURVE: fresh keys for each role in the state directory (README.md, "
                   "\"Security\").")
@click.option("--threads-per-worker", "threads", callback=threads_option, default=None, metavar="N",
              help="BLAS threads of each worker (default: this machine's cores // workers, at least 1; the "
                   "servers and the scheduler keep 1).")
@click.option("--max-message-bytes", callback=_size_or_none, default=None, metavar="BYTES",
              help="Passed to every server: refuse bigger messages (e.g. 1GiB; default: the server's, 512MiB).")
@click.option("--max-table-bytes", callback=_size_or_none, default=None, metavar="BYTES",
              help="Passed to every server: parameters and optimizer state it may hold (default: the server's, "
                   "half of this machine's memory).")
@click.option("--max-model-bytes", callback=_size_or_none, default=None, metavar="BYTES",
              help="Passed to the scheduler: refuse jobs whose parameters exceed this (default: the scheduler's, "
                   "a quarter of this machine's memory).")
def run(job_file, servers, workers, device, as_json, quiet, plot, state_dir, data_roots, curve, threads,
        max_message_bytes, max_table_bytes, max_model_bytes):
    """Run JOB_FILE (`-`: standard input) on a local cluster started for it; exits 0 if the job succeeded."""
    from protocol.messages import Submit
    from worker.local_cluster import ClusterError, LocalCluster

    spec = load_and_check(job_file)
    servers = servers or int(os.environ.get("DMLC_NUM_SERVER") or 1)
    workers = workers or int(os.environ.get("DMLC_NUM_WORKER") or spec["workers"])
    keep = state_dir is not None
    state_dir = state_dir or tempfile.mkdtemp(prefix="psctl-run-")
    os.makedirs(state_dir, exist_ok=True)
    cluster = LocalCluster(state_dir)
    status, code = JobState.FAILED.value, EXIT_FAILED
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        worker_args = ["--device", device, *(arg for root in data_roots for arg in ("--data-root", root))]
        curve_dir = cluster.make_keys(os.path.join(state_dir, "keys")) if curve else None
        server_args = [arg for name, value in (("--max-message-bytes", max_message_bytes),
                                               ("--max-table-bytes", max_table_bytes)) if value is not None
                       for arg in (name, str(value))]
        scheduler_args = ["--max-model-bytes", str(max_model_bytes)] if max_model_bytes is not None else []
        addr, client = cluster.boot(servers, [worker_args] * workers, curve_dir=curve_dir, threads_per_worker=threads,
                                    server_args=server_args, scheduler_args=scheduler_args)
        job = _call(client, Submit(spec=spec, submission_id=uuid.uuid4().hex))["job"]
        if not quiet:
            click.echo(f"local cluster: scheduler {addr}{' (CURVE)' if curve else ''}, {servers} server(s), "
                       f"{workers} worker(s); job {job}", err=True)
        body = wait_for(client, job, show=not quiet, plot=plot)
        status = body["state"]
        print_summary(job_summary(body), as_json=as_json)
        client.close()
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through _interrupt
        click.echo("interrupted: stopping the local cluster", err=True)
        code = interrupt_exit_code(exc)
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)
        if not keep:
            shutil.rmtree(state_dir, ignore_errors=True)
    if status != JobState.SUCCEEDED:
        raise SystemExit(code)


def _interrupt(signum, frame) -> None:
    """SIGTERM ends `psctl run` the way Ctrl-C does, through the clean-up, but exits 143."""
    raise Terminated
