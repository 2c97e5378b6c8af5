"""`psctl start`: the daemon that DMLC_ROLE names, for ps-lite style launch scripts."""
from __future__ import annotations

import click


@click.command("start", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--role", envvar="DMLC_ROLE", type=click.Choice(["scheduler", "server", "worker"]), required=True,
              help="Which daemon (default: $DMLC_ROLE).")
@click.pass_context
def start(ctx, role):
    """Start the scheduler, a server or a worker, as DMLC_ROLE says; other options go to that daemon.

    With DMLC_PS_ROOT_URI/DMLC_PS_ROOT_PORT set, the scheduler binds that port
    and servers and workers find it there; a server without --shard-id gets
    the lowest free id from the scheduler.
    """
    daemon = ctx.parent.command.get_command(ctx.parent, role)  # `worker` is a plug-in (worker/cli)
    daemon.main(args=list(ctx.args), prog_name=f"psctl start --role {role}")
