"""`psctl logs JOB [--follow]`: a job's history as the scheduler recorded it.

Each event is one line: its time (UTC), its kind and a sentence: the
submission, the start and its shards, the plan, who was assigned which
partitions, who gave some back or finished them, workers that failed or
fell silent, shards that moved or were lost, the target reached, the end.
The scheduler keeps them in its job store (ps/registry.py, table `events`),
so they outlive the job and a scheduler restart. `--follow` prints new
events as they come until the job has ended.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone

import click

from protocol.jobstate import FINAL_STATES
from worker.cli.cmd_jobs import _call
from worker.cli.common import admin_connection

# How often `--follow` asks for new events.
FOLLOW_INTERVAL_S = 0.5


@click.command("logs")
@click.argument("job")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until the job ends.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
@admin_connection
def logs(job, follow, as_json, conn):
    """Print JOB's events (assignments, failures, evictions, its end) with their times."""
    from protocol.messages import Logs

    client = conn.client(timeout_s=5.0, retries=2)
    after = 0
    try:
        while True:
            body = _call(client, Logs(job=job, after=after))
            for event in body["events"]:
                click.echo(json.dumps(event, sort_keys=True) if as_json else format_event(event))
            after = body["next"]
            if body["events"]:
                continue  # a full page may have more behind it: ask again at once
            if not follow or body["state"] in FINAL_STATES:
                return
            time.sleep(FOLLOW_INTERVAL_S)  # polling a remote service for new lines
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    finally:
        client.close()


def format_event(event: dict) -> str:
    """`2026-12-01T17:04:57.679Z  assigned        worker-a assigned partitions 0,1`."""
    ts = datetime.fromtimestamp(event["ts"], tz=timezone.utc).isoformat(timespec="milliseconds")
    return f"{ts.replace('+00:00', 'Z')}  {event['kind']:<16} {event['text']}"
