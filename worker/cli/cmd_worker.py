"""`psctl worker`: run a worker daemon."""
from __future__ import annotations

import os
import signal

import click

from worker.cli.common import announce_ready, as_usage_error, curve_client_options, load_keys, scheduler_address


@click.command("worker")
@click.option("--scheduler", default=None, help="Scheduler address (or PSCLUSTER_SCHEDULER, or DMLC_PS_ROOT_URI/PORT).")
@click.option("--device", type=click.Choice(["cpu", "gpu", "auto"]), default="cpu", show_default=True,
              help="numpy on the CPU, cupy on a GPU, or a GPU if one works.")
@click.option("--worker-id", default=None, help="A stable id for this worker (default: host-pid-random).")
@click.option("--slowdown", type=click.FloatRange(1.0, 1000.0), default=1.0, show_default=True,
              help="Experiments only: a straggler, whose compute in each step takes this many times as long.")
@click.option("--max-tasks", type=click.IntRange(1), default=None, help="Exit after this many assignments.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics on this port.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Interface for the metrics port (0.0.0.0 in a container).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@click.option("--data-root", "data_roots", multiple=True, type=click.Path(file_okay=False),
              help="A directory jobs' idx: and npz: data may be read from (repeatable; or PSCLUSTER_DATA_ROOTS, "
                   "os.pathsep-separated). None: only sklearn:digits and synthetic:... .")
@curve_client_options
def worker(scheduler, device, worker_id, slowdown, max_tasks, metrics_port, metrics_host, log_level, data_roots,
           curve_dir, key_name):
    """Run a worker: take assignments from the scheduler and train (blocks until stopped)."""
    from protocol.logfmt import setup_logging
    from worker.daemon import WorkerDaemon
    from worker.data.roots import ENV_VAR, check_roots, roots_from_env
    from worker.device import DeviceError, select_device
    from worker.sched_client import SchedulerUnavailable

    setup_logging("worker", log_level)
    addr = scheduler_address(scheduler)
    # --data-root options, when given, replace the variable (they are not merged with it).
    roots = as_usage_error(check_roots, data_roots or roots_from_env(os.environ.get(ENV_VAR)))
    try:
        dev = select_device(device)
    except DeviceError as exc:
        raise click.ClickException(str(exc)) from None
    keys = load_keys(curve_dir, "worker", key_name)
    if keys is not None and worker_id and not keys.identity.owns_worker_id(worker_id):
        raise click.BadParameter(f"must be the key's name {keys.identity.name!r} or start with "
                                 f"'{keys.identity.name}-' under CURVE", param_hint="--worker-id")
    daemon = WorkerDaemon(addr, dev, worker_id=worker_id, slowdown=slowdown, max_tasks=max_tasks, keys=keys,
                          data_roots=roots)

    def on_signal(signum, frame):
        daemon.stop()
        raise SystemExit(0)  # interrupts a blocking wait; a step in flight is simply lost (workers are stateless)

    exporter = None
    if metrics_port is not None:
        from worker.metrics_http import start_exporter
        try:
            exporter = start_exporter(daemon.metrics, metrics_port, metrics_host)
        except OSError as exc:
            raise click.ClickException(f"cannot serve metrics on port {metrics_port}: {exc.strerror}") from None
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    announce_ready(role="worker", worker=daemon.worker, scheduler=addr, device=dev.name,
                   metrics_port=exporter.server_port if exporter else None, curve=keys is not None,
                   data_roots=list(roots))
    try:
        daemon.serve()
    except SchedulerUnavailable as exc:
        raise click.ClickException(str(exc)) from None
