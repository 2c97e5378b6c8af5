"""`psctl server`: run one parameter-server shard."""
from __future__ import annotations

import click

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
@click.option("--bind", default="tcp://127.0.0.1:0", show_default=True,
              help="Address to listen on; port 0 picks a free one.")
@click.option("--shard-id", type=click.IntRange(0, 65535), default=None, envvar="PSCLUSTER_SHARD_ID",
              help="This shard's number K (default: the scheduler assigns the lowest free one).")
@click.option("--scheduler", default=None, help="Scheduler to register with (or PSCLUSTER_SCHEDULER).")
@click.option("--advertise", default=None, help="Address peers should use, if not the bound one.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Where checkpoints are written and restored from.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics on this port.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Interface for the metrics port (0.0.0.0 in a container).")
@click.option("--max-message-bytes", callback=size_option, default="512MiB", show_default=True,
              help="Refuse bigger messages.")
@click.option("--max-table-bytes", callback=size_option, default=None,
              help="Parameters and optimizer state this shard holds at most, all jobs together "
                   "(default: half of this machine's memory).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@curve_options
def server(bind, shard_id, scheduler, advertise, checkpoint_dir, metrics_port, metrics_host, max_message_bytes,
           max_table_bytes, log_level, curve_dir, key_name, insecure):
    """Run one parameter-server shard (blocks until stopped)."""
    from protocol.logfmt import setup_logging
    from ps.shard import Shard, log
    from ps.transport import BindError

    setup_logging("server", log_level)
    check_address(bind, "--bind")
    protected_bind(bind, curve_dir=curve_dir, insecure=insecure, log=log)
    keys = server_keys(curve_dir, "server", key_name)
    sched = scheduler_address(scheduler)
    try:
        shard = Shard(shard_id, bind, scheduler=sched, advertise=advertise, checkpoint_dir=checkpoint_dir,
                      max_message_bytes=max_message_bytes, max_table_bytes=max_table_bytes, keys=keys)
        shard.start()  # claims a shard id if none was given, restores checkpoints, registers
    except (BindError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    port = serve_metrics_or_fail(shard.metrics, metrics_port, metrics_host, shard.close)
    on_stop_signals(shard.stop)
    announce_ready(role="server", shard=shard.shard_id, addr=shard.endpoint, advertise=shard.advertise,
                   metrics_port=port, curve=keys is not None)
    shard.serve()
