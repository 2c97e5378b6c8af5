"""`psctl worker`: run a worker daemon."""
from __future__ import annotations

import os
import re
import signal

import click

from protocol.endpoints import metrics_host as default_metrics_host
from worker.cli.common import (
    BadInput,
    announce_ready,
    as_usage_error,
    curve_client_options,
    load_keys,
    scheduler_address,
)

# The most BLAS threads --threads-per-worker may ask for (OpenBLAS builds cap theirs at 64 to 512).
MAX_BLAS_THREADS = 1024


def threads_option(ctx, param, value):
    """click callback for --threads-per-worker: None, or a whole number of threads (else one sentence, exit 2)."""
    if value is None:
        return None
    text = str(value).strip()
    if not re.fullmatch(r"\d{1,6}", text) or not 1 <= int(text) <= MAX_BLAS_THREADS:
        raise BadInput(f"--threads-per-worker must be a whole number of threads from 1 to {MAX_BLAS_THREADS}, "
                       f"found {value!r}")
    return int(text)


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
@click.option("--metrics-host", default=None,
              help="Interface for the metrics port (default 127.0.0.1, or 0.0.0.0 with a scheduler on another "
                   "machine).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@click.option("--log-format", type=click.Choice(["logfmt", "json"]), default="logfmt", show_default=True,
              envvar="PSCLUSTER_LOG_FORMAT", help="Log lines on stderr: key=value, or one JSON object each.")
@click.option("--data-root", "data_roots", multiple=True, type=click.Path(file_okay=False),
              help="A directory jobs' idx: and npz: data may be read from (repeatable; or PSCLUSTER_DATA_ROOTS, "
                   "os.pathsep-separated). None: only sklearn:digits and synthetic:... .")
@click.option("--threads-per-worker", "threads", callback=threads_option, default=None, metavar="N",
              help="BLAS threads of this worker's matrix products (default: as OPENBLAS_NUM_THREADS / "
                                "OMP_NUM_THREADS say, else one per core; psctl run gives each worker cores // "
                                "workers).")
@curve_client_options
def worker(scheduler, device, worker_id, slowdown, max_tasks, metrics_port, metrics_host, log_level, log_format,
           data_roots, threads, curve_dir, key_name):
    """Run a worker: take assignments from the scheduler and train (blocks until stopped).

    READY is printed, and /healthz turns 200, when the scheduler has answered
    the worker's registration; until then it keeps asking, and warns.
    """
    from protocol.logfmt import setup_logging
    from protocol.metrics import Health
    from worker.daemon import WorkerDaemon, log
    from worker.data.roots import ENV_VAR, check_roots, roots_from_env
    from worker.device import DeviceError, select_device
    from worker.sched_client import SchedulerError, SchedulerUnavailable

    setup_logging("worker", log_level, log_format)
    blas_threads = set_blas_threads(threads)
    if threads is not None and blas_threads not in (None, threads):
        log.warning("the BLAS library did not take the thread count asked for",
                    extra={"asked": threads, "blas_threads": blas_threads})
    log.info("blas threads", extra={"blas_threads": blas_threads, "asked": threads})
    addr = scheduler_address(scheduler)
    metrics_host = metrics_host or default_metrics_host(addr)  # every interface for a scheduler elsewhere
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
    health = Health(f"not registered with the scheduler at {addr} yet")
    port = None

    def ready() -> None:  # called by the daemon once the scheduler answered its registration
        health.healthy()
        announce_ready(role="worker", worker=daemon.worker, scheduler=addr, device=dev.name, metrics_port=port,
                       curve=keys is not None, data_roots=list(roots), blas_threads=blas_threads)

    daemon = WorkerDaemon(addr, dev, worker_id=worker_id, slowdown=slowdown, max_tasks=max_tasks, keys=keys,
                          data_roots=roots, on_ready=ready)

    def on_signal(signum, frame):
        daemon.stop()
        raise SystemExit(0)  # interrupts a blocking wait; a step in flight is simply lost (workers are stateless)

    if metrics_port is not None:
        from worker.metrics_http import serve_metrics
        try:
            port = serve_metrics(daemon.metrics, health, metrics_port, metrics_host).server_port
        except OSError as exc:
            raise click.ClickException(f"cannot serve metrics on {metrics_host}:{metrics_port}: "
                                       f"{exc.strerror}") from None
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon.serve()  # registers (READY), then takes assignments
    except SchedulerUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    except SchedulerError as exc:
        raise click.ClickException(f"the scheduler at {addr} refused: {exc.reason}") from None


def set_blas_threads(threads: int | None) -> int | None:
    """Resize this process's BLAS (and OpenMP) thread pools to `threads` (None: leave them); the BLAS threads now.

    numpy reads OPENBLAS_NUM_THREADS once, when it loads its BLAS: later
    the variable changes nothing, so the pool is resized in place with
    threadpoolctl (openblas_set_num_threads and friends). Returns what the
    library reports afterwards, None if no BLAS is loaded.
    """
    import numpy  # noqa: F401  (threadpoolctl acts on the libraries already loaded: numpy's BLAS must be one)
    from threadpoolctl import threadpool_info, threadpool_limits

    if threads is not None:
        threadpool_limits(limits=threads)  # stays in force: no `with`, nothing restores the old sizes
    counts = [lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return max(counts) if counts else None
