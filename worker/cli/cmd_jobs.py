"""User commands: submit, wait, status, list, cancel, export, evict-shard.

Exit codes (worker/cli/common.py, README.md "Exit codes"): `submit --wait`
and `wait` exit 0 when the job succeeded, 1 when it failed or was
cancelled; on Ctrl-C (130) or SIGTERM (143) they say in one line that the
job goes on and how to follow it again (`psctl wait JOB`) or stop it
(`psctl cancel JOB`).
"""
from __future__ import annotations

import itertools
import json
import sys
import time
import uuid

import click

from protocol.jobstate import FINAL_STATES, JobState
from worker.cli.common import (
    EXIT_FAILED,
    BadInput,
    Connection,
    admin_connection,
    interrupt_exit_code,
    sigterm_as_interrupt,
)
from worker.views.progress import ProgressBar
from worker.views.report import job_summary, print_summary

# How often `--wait` asks the scheduler how the job is doing.
POLL_INTERVAL_S = 0.5
# While following a job it was already talking to, a poll is re-sent this
# many times (Lazy Pirate) before the scheduler's silence ends the wait.
POLL_RETRIES = 2
STDIN = "-"


def _client(conn: Connection):
    return conn.client()


def _call(client, msg, *, retries: int | None = None, on_silence: str = ""):
    """One request; scheduler errors and silence (with `on_silence` added) become one-sentence
    ClickExceptions (exit 1)."""
    from worker.sched_client import SchedulerError, SchedulerUnavailable

    try:
        return client.request(msg, retries=retries).body
    except SchedulerError as exc:
        raise click.ClickException(exc.reason) from None
    except SchedulerUnavailable as exc:
        raise click.ClickException(f"{exc}{on_silence}") from None


def load_and_check(path: str) -> dict:
    """Validate a job file (`-`: standard input) here, before anything reaches the cluster; BadInput if wrong."""
    from protocol.jobspec import SpecError, load_job_file, parse_job_text

    try:
        spec = parse_job_text(sys.stdin.read(), source="<stdin>") if path == STDIN else load_job_file(path)
    except SpecError as exc:
        raise BadInput(str(exc)) from None
    from worker.data import DataError, parse_source

    try:
        parse_source(spec["data"]["source"])
    except DataError as exc:
        raise BadInput(f"data.source: {exc}") from None
    return spec


def wait_for(client, job: str, *, show: bool = True, timeout_s: float | None = None,
             plot: str | None = None) -> dict:
    """Poll `job` until it ends, drawing the progress bar; returns its final status body.

    The bar is closed before anything else is printed. A job already over at
    the first poll draws no bar. With `plot`, the loss curve it saw is
    written there as a PNG.
    """
    from protocol.messages import Status

    bar = ProgressBar(label=job) if show else None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    retries = 0  # the first poll is the first contact (`psctl wait`): one bounded wait
    try:
        for polls in itertools.count(1):  # as long as the job runs; every poll is bounded
            body = _call(client, Status(job=job), retries=retries)
            retries = POLL_RETRIES
            over = body["state"] in FINAL_STATES
            if bar is not None and body.get("progress") and not (over and polls == 1):
                bar.update(body["progress"])
            if over:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise click.ClickException(f"job {job} did not finish within {timeout_s:g}s (still {body['state']})")
            time.sleep(POLL_INTERVAL_S)  # polling a remote service, not waiting on a test
    finally:
        if bar is not None:
            bar.close()
    if plot:
        _plot(body.get("curve") or [], plot, job)  # the scheduler's samples of the whole run
    return body


def follow(client, job: str, *, as_json: bool, plot: str | None = None, show: bool = True) -> None:
    """Wait for `job` and print its summary; exit 1 unless it succeeded.

    Ctrl-C or SIGTERM stops only the waiting: one line says the job goes on
    and names `psctl wait` and `psctl cancel`, then exit 130 or 143.
    """
    with sigterm_as_interrupt():
        try:
            body = wait_for(client, job, plot=plot, show=show)
        except KeyboardInterrupt as exc:
            click.echo(f"stopped waiting; job {job} goes on: `psctl wait {job}` follows it again, "
                       f"`psctl cancel {job}` stops it", err=True)
            raise SystemExit(interrupt_exit_code(exc)) from None
    print_summary(job_summary(body), as_json=as_json)
    if body["state"] != JobState.SUCCEEDED:
        raise SystemExit(EXIT_FAILED)


def _plot(rows: list[dict], path: str, job: str) -> None:
    from worker.views.progress import write_loss_plot

    try:
        written = write_loss_plot(rows, path, title=job)
    except OSError as exc:
        raise click.ClickException(f"cannot write the plot {path}: {exc.strerror}") from None
    if written is None:
        click.echo("no plot written: matplotlib is not installed (pip install 'pscluster[plot]')", err=True)
    else:
        click.echo(f"loss curve written to {written}", err=True)


def init_source(value: str, spec: dict) -> str:
    """`--init-from`: an export file (checked here: it loads and its model is the job's) or a job id."""
    import os

    from protocol.jobspec import SpecError, validate_job

    if os.path.exists(value):
        from worker.export_file import ExportFileError, load_export

        try:
            theirs, _tensors, _meta = load_export(value)
        except ExportFileError as exc:
            raise BadInput(f"--init-from: {exc}") from None
        if theirs["model"] != spec["model"]:
            raise BadInput(f"--init-from: {value} holds a {theirs['model']['kind']} model other than this job's "
                           f"(model section {theirs['model']} vs {spec['model']})")
        source = "file:" + os.path.abspath(value)
    else:
        source = "job:" + value
    try:
        validate_job({**spec, "init_from": source})
    except SpecError:
        raise BadInput(f"--init-from {value!r}: no such file, and not a job id (letters, digits, '.', '_', "
                       "'-')") from None
    return source


@click.command("submit")
@click.argument("job_file", type=click.Path(dir_okay=False, allow_dash=True))
@admin_connection
@click.option("--wait", is_flag=True, help="Show a live progress bar and wait for the job to end.")
@click.option("--json", "as_json", is_flag=True, help="With --wait: print the summary as one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="With --wait: write the loss curve to this PNG file.")
@click.option("--submission-id", default=None, metavar="ID",
              help="Submitting the same ID again returns the job it made instead of a new one "
                   "(default: a fresh id, named in the error if the scheduler does not answer).")
@click.option("--init-from", "init_from", default=None, metavar="FILE|JOB_ID",
              help="Start from these parameters instead of the seeded ones: a file psctl export wrote (read "
                   "by the workers at its absolute path, under their --data-root) or a job's id (same model "
                   "and shard count: the shards copy its table).")
def submit(job_file, conn, wait, as_json, plot, submission_id, init_from):
    """Submit JOB_FILE (`-`: read it from standard input); prints the job id.

    With --wait, follows it like `psctl wait` and exits 0 only if it succeeded.
    """
    from protocol.messages import Submit

    if plot and not wait:
        raise BadInput("--plot needs --wait: the loss curve is written when the job ends")
    if submission_id is not None and not (0 < len(submission_id) <= 128 and submission_id.isprintable()):
        raise BadInput("--submission-id must be 1 to 128 printable characters")
    spec = load_and_check(job_file)
    if init_from is not None:
        spec["init_from"] = init_source(init_from, spec)
    client = _client(conn)
    sid = submission_id or uuid.uuid4().hex
    # Unanswered, the submit may still have arrived: the same id again returns its job, never a second one.
    job = _call(client, Submit(spec=spec, submission_id=sid),
                on_silence=f"; to submit again without risking a second job, add --submission-id {sid}")["job"]
    if not wait:
        click.echo(json.dumps({"job": job}) if as_json else job)
        return
    click.echo(f"submitted {job}", err=True)
    follow(client, job, as_json=as_json, plot=plot)


@click.command("wait")
@click.argument("job")
@admin_connection
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write the loss curve to this PNG file when the job ends.")
def wait(job, conn, as_json, plot):
    """Follow JOB until it ends (progress bar, then its summary); exits 0 only if it succeeded.

    Re-attaches to a job submitted without --wait or left by Ctrl-C; on a job
    that is over it prints the summary at once.
    """
    follow(_client(conn), job, as_json=as_json, plot=plot)


@click.command("status")
@click.argument("job", required=False)
@admin_connection
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def status(job, conn, as_json):
    """Show one job (clocks, staleness, progress) or, without JOB, the cluster."""
    from protocol.messages import Status
    from worker.views.report import render_cluster, render_job

    body = _call(_client(conn), Status(job=job or ""))
    if as_json:
        click.echo(json.dumps(body, sort_keys=True, default=str))
    else:
        click.echo(render_job(body) if job else render_cluster(body))


@click.command("list")
@admin_connection
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as one JSON object.")
def list_jobs(conn, as_json):
    """List every job, newest first."""
    from protocol.messages import List
    from worker.views.report import render_list

    body = _call(_client(conn), List())
    click.echo(json.dumps(body, sort_keys=True, default=str) if as_json else render_list(body["jobs"]))


@click.command("cancel")
@click.argument("job")
@admin_connection
def cancel(job, conn):
    """Cancel a queued or running job; its workers move on to the next job."""
    from protocol.messages import Cancel

    body = _call(_client(conn), Cancel(job=job))
    click.echo(f"{body['job']} {body['state']}")


@click.command("export")
@click.argument("job")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), required=True,
              help="Write here: safetensors, or numpy's format if the name ends in .npz.")
@admin_connection
def export(job, output, conn):
    """Save a job's parameters (as they are now) with its job spec and result, in one file.

    The file is safetensors (torch, JAX and Hugging Face read it as it is;
    the job's spec, state, result and the pscluster version are its
    metadata); a name ending in .npz gets an .npz instead, whose keys are
    the tensor names and whose zip comment is the metadata. `psctl
    evaluate FILE` reads either.
    """
    from protocol.errors import ProtocolError
    from protocol.messages import Export
    from protocol.plan import Plan
    from worker.client import ParamClient, ShardError, ShardTimeout
    from worker.export_file import ExportFileError, export_metadata, write_export

    body = _call(_client(conn), Export(job=job))
    if not isinstance(body.get("spec"), dict):
        # A scheduler older than this psctl: without the spec the file could not be evaluated or rebuilt.
        raise click.ClickException(f"the scheduler sent no job spec with {job}'s parameters: upgrade it to "
                                   "this pscluster's version to export")
    try:
        plan = Plan.from_wire(body["plan"])
    except ProtocolError as exc:
        raise click.ClickException(f"job {job}'s plan is unreadable: {exc.message}") from None
    try:
        curve = conn.keys.pair if conn.keys else None
        with ParamClient(body["shards"], plan, job=job, timeout_s=10.0, retries=2, curve=curve,
                         shard_keys=body.get("shard_keys") or ()) as client:
            arrays = client.pull()  # every tensor of the plan: running statistics (nonlearned) included
    except (ShardError, ShardTimeout) as exc:
        raise click.ClickException(str(exc)) from None
    meta = export_metadata(job=body.get("job", job), state=body["state"], spec=body["spec"],
                           result=body.get("result"), nonlearned=list(body.get("nonlearned") or []))
    try:
        write_export(output, arrays, meta)
    except ExportFileError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None
    total = sum(a.nbytes for a in arrays.values())
    click.echo(f"wrote {len(arrays)} tensors ({total:,} bytes) of {job} ({body['state']}) to {output}")


@click.command("evict-shard")
@click.argument("shard", type=click.IntRange(0, 4095))
@admin_connection
def evict_shard(shard, conn):
    """Declare server shard SHARD dead now, so a replacement can take its id before the heartbeat timeout."""
    from protocol.messages import Evict

    body = _call(_client(conn), Evict(shard=shard))
    click.echo(f"shard {body['shard']} ({body['addr']}) evicted")
