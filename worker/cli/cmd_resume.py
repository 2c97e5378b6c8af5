"""`psctl resume JOB`: run a failed or cancelled job again from where its partitions stood.

The scheduler queues it again and starts it the way it starts the jobs it
was running before a restart: the shards' tables as they are, or, where a
shard restarted since, every shard back at the job's newest complete
checkpoint (ps/sched/checkpoints.py). With --wait it is followed as
`psctl submit --wait` follows a job.
"""
from __future__ import annotations

import click

from worker.cli.cmd_jobs import _call, _client, follow
from worker.cli.common import admin_connection


@click.command("resume")
@click.argument("job")
@admin_connection
@click.option("--wait", is_flag=True, help="Show a live progress bar and wait for the job to end.")
@click.option("--json", "as_json", is_flag=True, help="With --wait: print the summary as one JSON object.")
def resume(job, conn, wait, as_json):
    """Resume JOB (failed or cancelled) from its partitions' last steps or its newest complete checkpoint."""
    from protocol.messages import Resume

    client = _client(conn)
    body = _call(client, Resume(job=job))
    click.echo(f"resumed {body['job']} ({body['state']})", err=wait)
    if wait:
        follow(client, body["job"], as_json=as_json)
