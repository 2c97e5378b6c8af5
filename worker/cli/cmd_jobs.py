"""User commands: submit, status, list, cancel, export."""
from __future__ import annotations

import json
import time
import uuid

import click

from protocol.jobstate import FINAL_STATES, JobState
from worker.cli.common import Connection, admin_connection
from worker.views.progress import ProgressBar
from worker.views.report import job_summary, print_summary

# How often `--wait` asks the scheduler how the job is doing.
POLL_INTERVAL_S = 0.5


def _client(conn: Connection):
    return conn.client(timeout_s=5.0, retries=2)


def _call(client, msg):
    """One request; scheduler errors and silence become one-sentence ClickExceptions."""
    from worker.sched_client import SchedulerError, SchedulerUnavailable

    try:
        return client.request(msg).body
    except SchedulerError as exc:
        raise click.ClickException(exc.reason) from None
    except SchedulerUnavailable as exc:
        raise click.ClickException(str(exc)) from None


def load_and_check(path: str) -> dict:
    """Validate a job file here, before anything reaches the cluster."""
    from protocol.jobspec import SpecError, load_job_file

    try:
        spec = load_job_file(path)
    except SpecError as exc:
        raise click.ClickException(str(exc)) from None
    from worker.data import DataError, parse_source

    try:
        parse_source(spec["data"]["source"])
    except DataError as exc:
        raise click.ClickException(f"data.source: {exc}") from None
    return spec


def wait_for(client, job: str, *, show: bool = True, timeout_s: float | None = None,
             plot: str | None = None) -> dict:
    """Poll `job` until it ends, drawing the progress bar; returns its final status body.

    With `plot`, the loss curve it saw is written there as a PNG.
    """
    from protocol.messages import Status

    bar = ProgressBar(label=job) if show else None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            body = _call(client, Status(job=job))
            if bar is not None and body.get("progress"):
                bar.update(body["progress"])
            if body["state"] in FINAL_STATES:
                if plot:
                    _plot(body.get("curve") or [], plot, job)  # the scheduler's samples of the whole run
                return body
            if deadline is not None and time.monotonic() > deadline:
                raise click.ClickException(f"job {job} did not finish within {timeout_s:g}s (still {body['state']})")
            time.sleep(POLL_INTERVAL_S)  # polling a remote service, not waiting on a test
    finally:
        if bar is not None:
            bar.close()


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


@click.command("submit")
@click.argument("job_file", type=click.Path(dir_okay=False))
@admin_connection
@click.option("--wait", is_flag=True, help="Show a live progress bar and wait for the job to end.")
@click.option("--json", "as_json", is_flag=True, help="With --wait: print the summary as one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="With --wait: write the loss curve to this PNG file.")
@click.option("--submission-id", default=None, metavar="ID",
              help="Submitting the same ID again returns the job it made instead of a new one "
                   "(default: a fresh id, reused by this command's own retries).")
def submit(job_file, conn, wait, as_json, plot, submission_id):
    """Submit JOB_FILE; prints the job id (with --wait, exits 0 only if the job succeeded)."""
    from protocol.messages import Submit

    spec = load_and_check(job_file)
    if submission_id is not None and not (0 < len(submission_id) <= 128 and submission_id.isprintable()):
        raise click.BadParameter("must be 1 to 128 printable characters", param_hint="--submission-id")
    client = _client(conn)
    # The client re-sends a silent request as it is, id included: a retry never makes a second job.
    job = _call(client, Submit(spec=spec, submission_id=submission_id or uuid.uuid4().hex))["job"]
    if not wait:
        click.echo(json.dumps({"job": job}) if as_json else job)
        return
    click.echo(f"submitted {job}", err=True)
    body = wait_for(client, job, plot=plot)
    print_summary(job_summary(body), as_json=as_json)
    if body["state"] != JobState.SUCCEEDED:
        raise SystemExit(1)


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
              help="Write the parameters here (.npz, one array per tensor name).")
@admin_connection
def export(job, output, conn):
    """Save a job's parameters (as they are now) to an .npz file loadable by numpy.load."""
    import numpy as np

    from protocol.errors import ProtocolError
    from protocol.messages import Export
    from protocol.plan import Plan
    from worker.client import ParamClient, ShardError, ShardTimeout

    body = _call(_client(conn), Export(job=job))
    try:
        plan = Plan.from_wire(body["plan"])
    except ProtocolError as exc:
        raise click.ClickException(f"job {job}'s plan is unreadable: {exc.message}") from None
    try:
        curve = conn.keys.pair if conn.keys else None
        with ParamClient(body["shards"], plan, job=job, timeout_s=10.0, retries=2, curve=curve,
                         shard_keys=body.get("shard_keys") or ()) as client:
            arrays = client.pull()
    except (ShardError, ShardTimeout) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        with open(output, "wb") as fh:
            np.savez(fh, **arrays)
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror}") from None
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
