"""Every metric a pscluster daemon exports, and the one exporter that serves them.

One table (METRICS) names each metric once, for every role: its type, its
help, its label names, the roles that export it and, for a histogram, its
buckets; a name means one thing whichever daemon serves it. A daemon keeps
its metrics in a `MetricsRegistry`, backed by a `prometheus_client`
CollectorRegistry of its own (typed counters, gauges and histograms, with
the process and Python collectors beside them), and updates them with
`inc`, `set` and `histogram(...).observe` from its loop thread; the HTTP
thread only reads (prometheus_client locks each value). Series labelled
with a job (`job_id`) end with the job: `forget_job` removes them.

`exporter_app` is the WSGI application every daemon serves (pure: no
sockets here): /metrics (the exposition format), /healthz (200 once the
daemon says it is healthy, 503 with the reason until then), 404 for
anything else. The servers that run it are ps/metrics_http.py and
worker/metrics_http.py, one per side of the layout.

The label is `job_id`, not `job`: Prometheus gives every scraped series a
`job` label of its own (the scrape job), and would rename ours.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

PREFIX = "pscluster"
JOB_LABEL = "job_id"

# Upper bounds of the staleness histograms, in versions (shards: staleness
# of applied gradients; workers: updates by others between pull and push).
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)
# Upper bounds of the step-time histogram, in seconds.
STEP_SECONDS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)

SCHEDULER, SERVER, WORKER = "scheduler", "server", "worker"


@dataclass(frozen=True)
class MetricSpec:
    kind: str                       # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()     # the daemons that export it (created when they start)
    buckets: tuple[float, ...] = ()  # histograms only


def _spec(kind, text, labels=(), roles=(), buckets=()) -> MetricSpec:
    return MetricSpec(kind, text, tuple(labels), tuple(roles), tuple(buckets))


# name (without the `pscluster_` prefix) -> what it is. Counters end in _total.
METRICS: dict[str, MetricSpec] = {
    # every daemon: 1, labelled with what it is (dashboards join process metrics on it)
    "info": _spec("gauge", "This daemon: its role and pscluster's version (always 1)", ["role", "version"],
                  [SCHEDULER, SERVER, WORKER]),
    # server shards
    "pushes_total": _spec("counter", "Pushes accepted", roles=[SERVER]),
    "pulls_total": _spec("counter", "Pulls received", roles=[SERVER]),
    "duplicates_total": _spec("counter", "Repeated requests answered from the last reply", roles=[SERVER]),
    "parked_pulls": _spec("gauge", "Pulls held by a consistency policy", roles=[SERVER]),
    "staleness": _spec("histogram", "Versions between a gradient's base and its application", [JOB_LABEL],
                       [SERVER], STALENESS_BUCKETS),
    "checkpoints_total": _spec("counter", "Checkpoints written", roles=[SERVER]),
    # shards and the scheduler
    "rejected_total": _spec("counter", "Messages refused with an error reply, by code", ["code"],
                            [SERVER, SCHEDULER]),
    "bytes_received_total": _spec("counter", "Bytes received", roles=[SERVER, SCHEDULER]),
    "bytes_sent_total": _spec("counter", "Bytes sent", roles=[SERVER, SCHEDULER]),
    "internal_errors_total": _spec("counter", "Bugs hit and survived (logged with a traceback)",
                                   roles=[SERVER, SCHEDULER]),
    # the scheduler
    "workers": _spec("gauge", "Workers registered and alive", roles=[SCHEDULER]),
    "servers": _spec("gauge", "Server shards registered and alive", roles=[SCHEDULER]),
    "jobs_running": _spec("gauge", "Jobs running", roles=[SCHEDULER]),
    "jobs_submitted_total": _spec("counter", "Jobs submitted", roles=[SCHEDULER]),
    "jobs_finished_total": _spec("counter", "Jobs ended, by final state", ["state"], [SCHEDULER]),
    # workers (per job: removed when the worker's part in the job ends)
    "steps_total": _spec("counter", "Training steps completed (one per partition and step)", [JOB_LABEL],
                         [WORKER]),
    "examples_total": _spec("counter", "Training examples processed", [JOB_LABEL], [WORKER]),
    "step_seconds": _spec("histogram", "Time of one step: compute, push_pull, waits", [JOB_LABEL], [WORKER],
                          STEP_SECONDS_BUCKETS),
    "loss": _spec("gauge", "Training loss of the last minibatch", [JOB_LABEL], [WORKER]),
    "accuracy": _spec("gauge", "Training accuracy of the last minibatch", [JOB_LABEL], [WORKER]),
    "test_accuracy": _spec("gauge", "Last evaluated test accuracy", [JOB_LABEL], [WORKER]),
    "examples_per_second": _spec("gauge", "Examples per second of the last step", [JOB_LABEL], [WORKER]),
    "assignments_total": _spec("counter", "Assignments ended, by outcome", ["outcome"], [WORKER]),
    "staleness_seen": _spec("histogram", "Updates by others between this worker's pull and its push",
                            [JOB_LABEL], [WORKER], STALENESS_BUCKETS),
}

_TYPES = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}

# Counters export X_total only, not a X_created series beside each (a process-wide switch;
# prometheus_client >= 0.17 has it, PROMETHEUS_DISABLE_CREATED_SERIES does the same).
if hasattr(prometheus_client, "disable_created_metrics"):
    prometheus_client.disable_created_metrics()


def _version() -> str:
    try:
        return importlib.metadata.version("pscluster")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def exported_name(name: str) -> str:
    """The name a metric of METRICS has on the wire: `pscluster_` + name."""
    return f"{PREFIX}_{name}"


class MetricsRegistry:
    """The metrics of one daemon (`role`: scheduler, server, worker, or None).

    Those of its role are created at once, so they are exported (at 0)
    before their first use; any other metric of METRICS is created when
    first used. A name not in METRICS is a KeyError, wrong labels a
    ValueError. `get` reads a counter's or gauge's value (0 for a series
    never touched); it never creates one.
    """

    def __init__(self, role: str | None = None, *, process: bool = True):
        self.role = role
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, object] = {}
        # (name, sorted label items) -> child; unlabelled metrics under their name alone.
        self._children: dict = {}
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        for name, spec in METRICS.items():
            if role in spec.roles:
                self._metric(name)
        if role is not None:
            self.set("info", 1, role=role, version=_version())

    # --- creation ---

    def _metric(self, name: str):
        metric = self._metrics.get(name)
        if metric is None:
            spec = METRICS[name]
            kwargs = {"buckets": spec.buckets} if spec.kind == "histogram" else {}
            metric = _TYPES[spec.kind](name, spec.help, spec.labels, namespace=PREFIX, registry=self.registry,
                                       **kwargs)
            self._metrics[name] = metric
            if not spec.labels:
                self._children[name] = metric
        return metric

    def _child(self, name: str, labels: dict):
        key = (name, tuple(sorted(labels.items()))) if labels else name
        child = self._children.get(key)
        if child is None:
            metric = self._metric(name)
            if labels or METRICS[name].labels:
                child = metric.labels(**labels)
                self._children[key] = child
            else:
                child = metric
        return child

    # --- the daemons' calls ---

    def inc(self, name: str, amount: float = 1.0, **labels) -> None:
        child = self._children.get((name, tuple(sorted(labels.items()))) if labels else name)
        (child or self._child(name, labels)).inc(amount)

    def set(self, name: str, value: float, **labels) -> None:
        child = self._children.get((name, tuple(sorted(labels.items()))) if labels else name)
        (child or self._child(name, labels)).set(value)

    def histogram(self, name: str, **labels):
        """The histogram series `name` with `labels` (call `.observe(value)` on it)."""
        if METRICS[name].kind != "histogram":
            raise ValueError(f"{name} is a {METRICS[name].kind}, not a histogram")
        return self._child(name, labels)

    def get(self, name: str, **labels) -> float:
        if METRICS[name].kind == "histogram":
            raise ValueError(f"{name} is a histogram: read it from the exposition")
        child = self._children.get((name, tuple(sorted(labels.items()))) if labels else name)
        return float(child._value.get()) if child is not None else 0.0

    def forget_job(self, job: str) -> int:
        """Remove every series labelled with `job` (its job has ended here); returns how many."""
        gone = [key for key in self._children if type(key) is tuple and (JOB_LABEL, job) in key[1]]
        for name, items in gone:
            values = dict(items)
            self._metrics[name].remove(*(values[label] for label in METRICS[name].labels))
            del self._children[(name, items)]
        return len(gone)

    def render(self) -> str:
        """The exposition text (format 0.0.4) of every metric, process metrics included."""
        return prometheus_client.generate_latest(self.registry).decode()


class Health:
    """Whether a daemon is healthy, and why not: it says so, the exporter's /healthz reads it."""

    def __init__(self, reason: str = "starting"):
        self.reason: str | None = reason   # None: healthy (one attribute: safe to read from another thread)

    @property
    def ok(self) -> bool:
        return self.reason is None

    def healthy(self) -> None:
        self.reason = None

    def unhealthy(self, reason: str) -> None:
        self.reason = reason or "unhealthy"


def exporter_app(metrics: MetricsRegistry, health: Health):
    """The WSGI application of every daemon's exporter: /metrics, /healthz, 404 for anything else."""
    exposition = prometheus_client.make_wsgi_app(metrics.registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return exposition(environ, start_response)
        if path == "/healthz":
            reason = health.reason
            status, body = ("200 OK", "ok") if reason is None else ("503 Service Unavailable", reason)
        else:
            status, body = "404 Not Found", f"not found: {path[:80]} (this exporter serves /metrics and /healthz)"
        data = (" ".join(body.split()) + "\n").encode()  # one line
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))])
        return [data]

    return app
