"""`psctl start`: the daemon that DMLC_ROLE names, for ps-lite style launch scripts.

A ps-lite launcher (MXNet's, BytePS's, or a hand-written one) starts the
same command on every machine with DMLC_ROLE, DMLC_PS_ROOT_URI,
DMLC_PS_ROOT_PORT and, per machine, DMLC_NODE_HOST or DMLC_INTERFACE set.
Each daemon reads those itself (protocol/endpoints.py: the scheduler's
address, where a daemon listens, what a server advertises); this command
only picks the daemon and gives the scheduler a state directory when the
launcher has none to give. README.md, "Running a cluster", has the rules.
"""
from __future__ import annotations

import os

import click

STATE_DIR_ENV = "PSCLUSTER_STATE_DIR"


def default_state_dir(environ=os.environ) -> str:
    """The scheduler's job registry when a launch gives none: per port, under XDG_STATE_HOME (~/.local/state)."""
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    port = environ.get("DMLC_PS_ROOT_PORT", "")
    return os.path.join(base, "pscluster", f"scheduler-{port}" if port.isdigit() else "scheduler")


def _given(args: list[str], option: str) -> bool:
    return any(arg == option or arg.startswith(option + "=") for arg in args)


@click.command("start", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--role", envvar="DMLC_ROLE", type=click.Choice(["scheduler", "server", "worker"]), required=True,
              help="Which daemon (default: $DMLC_ROLE).")
@click.pass_context
def start(ctx, role):
    """Start the scheduler, a server or a worker, as DMLC_ROLE says; other options go to that daemon.

    With DMLC_PS_ROOT_URI/DMLC_PS_ROOT_PORT set, the scheduler binds that port
    and servers and workers find it there; a server without --shard-id gets
    the lowest free id from the scheduler. With the scheduler on another
    machine, a server listens on every interface and advertises
    DMLC_NODE_HOST, else DMLC_INTERFACE's address, else the address that
    routes to the scheduler; across machines the daemons need --curve-dir
    (or PSCLUSTER_CURVE_DIR), or --insecure. The scheduler keeps its jobs
    in --state-dir, else PSCLUSTER_STATE_DIR, else
    $XDG_STATE_HOME/pscluster/scheduler-$DMLC_PS_ROOT_PORT.
    """
    args = list(ctx.args)
    if role == "scheduler" and not _given(args, "--state-dir") and not os.environ.get(STATE_DIR_ENV):
        args += ["--state-dir", default_state_dir()]
    daemon = ctx.parent.command.get_command(ctx.parent, role)  # `worker` is a plug-in (worker/cli)
    daemon.main(args=args, prog_name=f"psctl start --role {role}")
