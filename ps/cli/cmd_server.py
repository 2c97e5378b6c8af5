"""`psctl server`: run one parameter-server shard."""
from __future__ import annotations

import click

from protocol.endpoints import metrics_host as default_metrics_host
from protocol.endpoints import server_bind
from ps.cli.common import (
    announce_ready,
    check_address,
    curve_options,
    on_stop_signals,
    protected_bind,
    scheduler_address,
    serve_metrics_or_fail,
    server_keys,
    size_option,
)


@click.command("server")
@click.option("--bind", default=None,
              help="Address to listen on; port 0 picks a free one (default tcp://127.0.0.1:0, or "
                   "tcp://0.0.0.0:0 with a scheduler on another machine).")
@click.option("--shard-id", type=click.IntRange(0, 65535), default=None, envvar="PSCLUSTER_SHARD_ID",
              help="This shard's number K (default: the scheduler assigns the lowest free one).")
@click.option("--scheduler", default=None, help="Scheduler to register with (or PSCLUSTER_SCHEDULER).")
@click.option("--advertise", default=None,
              help="Address (or host) peers should use, if not the bound one (default for an all-interfaces "
                   "bind: DMLC_NODE_HOST, else DMLC_INTERFACE's address, else the route to the scheduler).")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where checkpoints are written and restored from.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics on this port.")
@click.option("--metrics-host", default=None,
              help="Interface for the metrics port (default 127.0.0.1, or 0.0.0.0 when --bind is not loopback).")
@click.option("--max-message-bytes", callback=size_option, default="512MiB", show_default=True,
              help="Refuse bigger messages.")
@click.option("--max-table-bytes", callback=size_option, default=None,
              help="Parameters and optimizer state this shard holds at most, all jobs together "
                   "(default: half of this machine's memory).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@click.option("--log-format", type=click.Choice(["logfmt", "json"]), default="logfmt", show_default=True,
              envvar="PSCLUSTER_LOG_FORMAT", help="Log lines on stderr: key=value, or one JSON object each.")
@curve_options
def server(bind, shard_id, scheduler, advertise, checkpoint_dir, metrics_port, metrics_host, max_message_bytes,
           max_table_bytes, log_level, log_format, curve_dir, key_name, insecure):
    """Run one parameter-server shard (blocks until stopped).

    READY is printed, and /healthz turns 200, when the scheduler has answered
    the shard's registration (at once without --scheduler).
    """
    from protocol.logfmt import setup_logging
    from protocol.metrics import Health
    from ps.shard import Shard, log
    from ps.transport import BindError

    setup_logging("server", log_level, log_format)
    sched = scheduler_address(scheduler)
    bind, implied_by = server_bind(bind, sched)  # all interfaces when the scheduler is on another machine
    check_address(bind, "--bind")
    protected_bind(bind, curve_dir=curve_dir, insecure=insecure, log=log, implied_by=implied_by)
    metrics_host = metrics_host or default_metrics_host(bind)
    keys = server_keys(curve_dir, "server", key_name)
    try:
        shard = Shard(shard_id, bind, scheduler=sched, advertise=advertise, checkpoint_dir=checkpoint_dir,
                      max_message_bytes=max_message_bytes, max_table_bytes=max_table_bytes, keys=keys)
    except (BindError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    health = Health(f"not registered with the scheduler at {sched} yet" if sched else "starting")
    port = serve_metrics_or_fail(shard.metrics, health, metrics_port, metrics_host, shard.close)

    def ready() -> None:  # called from the shard's loop: registered (or serving, without a scheduler)
        health.healthy()
        announce_ready(role="server", shard=shard.shard_id, addr=shard.endpoint, advertise=shard.advertise,
                       metrics_port=port, curve=keys is not None)

    shard.on_ready = ready
    try:
        shard.start()  # claims a shard id if none was given, restores checkpoints, registers
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    on_stop_signals(shard.stop)
    shard.serve()
