"""`psctl scheduler`: run the scheduler daemon."""
from __future__ import annotations

import os

import click

from protocol.endpoints import metrics_host as default_metrics_host
from protocol.endpoints import scheduler_bind
from ps.cli.common import (
    announce_ready,
    check_address,
    curve_options,
    on_stop_signals,
    protected_bind,
    serve_metrics_or_fail,
    server_keys,
    size_option,
)


@click.command("scheduler")
@click.option("--bind", default=None, help="Address to listen on (default tcp://127.0.0.1:0, a free port; "
                                           "or tcp://0.0.0.0:$DMLC_PS_ROOT_PORT, loopback when "
                                           "DMLC_PS_ROOT_URI is).")
@click.option("--state-dir", type=click.Path(file_okay=False), required=True, envvar="PSCLUSTER_STATE_DIR",
              help="Directory for the durable job registry (sqlite); or PSCLUSTER_STATE_DIR.")
@click.option("--heartbeat-timeout", type=click.FloatRange(0.5, 3600), default=6.0, show_default=True,
              help="Seconds of silence after which a peer is dead.")
@click.option("--max-model-bytes", callback=size_option, default=None,
              help="Refuse jobs whose model parameters exceed this (e.g. 2GiB; default: a quarter of this "
                   "machine's memory).")
@click.option("--max-failures", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Fail a job once one of its partitions failed this many times in a row.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics on this port.")
@click.option("--metrics-host", default=None,
              help="Interface for the metrics port (default 127.0.0.1, or 0.0.0.0 when --bind is not loopback).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@click.option("--log-format", type=click.Choice(["logfmt", "json"]), default="logfmt", show_default=True,
              envvar="PSCLUSTER_LOG_FORMAT", help="Log lines on stderr: key=value, or one JSON object each.")
@curve_options
def scheduler(bind, state_dir, heartbeat_timeout, max_model_bytes, max_failures, metrics_port, metrics_host,
              log_level, log_format, curve_dir, key_name, insecure):
    """Run the scheduler: durable jobs, membership, assignments (blocks until stopped)."""
    from protocol.logfmt import setup_logging
    from protocol.metrics import Health
    from ps.registry import StoreError
    from ps.scheduler import Scheduler, log
    from ps.transport import BindError

    setup_logging("scheduler", log_level, log_format)
    bind, implied_by = scheduler_bind(bind, os.environ)  # ps-lite's DMLC_PS_ROOT_PORT
    bind = check_address(bind, "--bind")
    protected_bind(bind, curve_dir=curve_dir, insecure=insecure, log=log, implied_by=implied_by)
    metrics_host = metrics_host or default_metrics_host(bind)
    keys = server_keys(curve_dir, "scheduler", key_name)
    try:
        os.makedirs(state_dir, exist_ok=True)
        sched = Scheduler(bind, state_dir, heartbeat_timeout_s=heartbeat_timeout, max_model_bytes=max_model_bytes,
                          max_failures=max_failures, keys=keys)
    except (BindError, StoreError) as exc:  # StoreError: a job store that would lie (ps/registry.py), untouched
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot use state dir {state_dir}: {exc.strerror}") from None
    # Healthy, and READY, once its job store is open and it listens: now.
    health = Health("starting")
    port = serve_metrics_or_fail(sched.metrics, health, metrics_port, metrics_host, sched.close)
    on_stop_signals(sched.stop)
    health.healthy()
    announce_ready(role="scheduler", addr=sched.endpoint, state_dir=str(state_dir),
                   metrics_port=port, curve=keys is not None)
    sched.serve()
