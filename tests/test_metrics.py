"""The metrics table, the registry on prometheus_client, the exporter app, the log formats, the dashboard.

In-process: a registry as the daemons use it, and the exporter served by
the real server of each side (ps/metrics_http.py, worker/metrics_http.py)
on a loopback port. The daemons' own exporters, as processes, are in
tests/test_metrics_http.py.
"""
from __future__ import annotations

import io
import json
import logging
import re
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from protocol.logfmt import JsonFormatter, LogfmtFormatter, log_format, setup_logging
from protocol.metrics import JOB_LABEL, METRICS, Health, MetricsRegistry, exported_name

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "pscluster-dashboard.json"
HTTP_TIMEOUT_S = 10


def families(text: str) -> dict:
    """name -> family, as a Prometheus server would parse the page."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(text: str, name: str) -> list:
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


# --- the table -----------------------------------------------------------------------------------------------


def test_the_table_is_consistent():
    for name, spec in METRICS.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert spec.kind in ("counter", "gauge", "histogram"), name
        assert name.endswith("_total") == (spec.kind == "counter"), f"{name}: counters, and only they, end in _total"
        assert bool(spec.buckets) == (spec.kind == "histogram"), name
        assert list(spec.buckets) == sorted(spec.buckets), name
        assert spec.roles and set(spec.roles) <= {"scheduler", "server", "worker"}, name
        assert "job" not in spec.labels, f"{name}: Prometheus owns the label `job`; ours is {JOB_LABEL}"
        assert spec.help, name


@pytest.mark.parametrize("role", ["scheduler", "server", "worker"])
def test_a_role_exports_its_metrics_typed_from_the_start(role):
    page = MetricsRegistry(role).render()
    found = families(page)
    for name, spec in METRICS.items():
        family = found.get(exported_name(name).removesuffix("_total"))
        if role in spec.roles:
            assert family is not None and family.type == spec.kind, name
        else:
            assert family is None, f"{name} is not a {role}'s"
    assert samples(page, "pscluster_info")[0].labels["role"] == role
    # process and Python metrics beside ours
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info", "python_gc_collections"} \
        <= set(found)


# --- the registry -------------------------------------------------------------------------------------------


def test_counters_render_every_digit():
    metrics = MetricsRegistry("server")
    metrics.inc("pushes_total", 1_000_007)
    metrics.inc("bytes_received_total", 2**40 + 1)
    metrics.inc("bytes_received_total", 10**12)
    page = metrics.render()
    assert samples(page, "pscluster_pushes_total")[0].value == 1_000_007
    assert samples(page, "pscluster_bytes_received_total")[0].value == 2**40 + 1 + 10**12
    assert metrics.get("bytes_received_total") == 2**40 + 1 + 10**12


def test_get_reads_a_value_and_never_creates_a_series():
    metrics = MetricsRegistry("server")
    assert metrics.get("rejected_total", code="bad_field") == 0.0
    assert samples(metrics.render(), "pscluster_rejected_total") == []
    metrics.inc("rejected_total", code="bad_field")
    metrics.inc("rejected_total", 2, code="bad_field")
    metrics.set("parked_pulls", 3)
    assert metrics.get("rejected_total", code="bad_field") == 3.0 and metrics.get("parked_pulls") == 3.0
    assert [s.labels for s in samples(metrics.render(), "pscluster_rejected_total")] == [{"code": "bad_field"}]


def test_names_and_labels_are_checked():
    metrics = MetricsRegistry("server")
    with pytest.raises(KeyError):
        metrics.inc("no_such_metric_total")
    with pytest.raises(ValueError):
        metrics.inc("rejected_total")                      # its label is missing
    with pytest.raises(ValueError):
        metrics.inc("pushes_total", job_id="j")             # it has none
    with pytest.raises(ValueError):
        metrics.histogram("pushes_total")                   # not a histogram


def test_forget_job_removes_every_series_of_that_job_and_only_those():
    metrics = MetricsRegistry("worker")
    for job in ("a", "b"):
        metrics.inc("steps_total", 5, job_id=job)
        metrics.set("loss", 0.5, job_id=job)
        metrics.histogram("step_seconds", job_id=job).observe(0.01)
        metrics.histogram("staleness_seen", job_id=job).observe(2)
    metrics.inc("assignments_total", outcome="done")
    assert metrics.forget_job("a") == 4
    page = metrics.render()
    jobs = {s.labels.get(JOB_LABEL) for f in text_string_to_metric_families(page) for s in f.samples}
    assert "a" not in jobs and "b" in jobs
    assert samples(page, "pscluster_assignments_total")[0].value == 1
    assert metrics.forget_job("a") == 0
    metrics.inc("steps_total", job_id="a")                  # the job comes back: a new series from 0
    assert metrics.get("steps_total", job_id="a") == 1


def test_histograms_have_the_tables_buckets():
    metrics = MetricsRegistry("server")
    metrics.histogram("staleness", job_id="j").observe(3)
    buckets = samples(metrics.render(), "pscluster_staleness_bucket")
    assert [float(s.labels["le"]) for s in buckets] == [*map(float, METRICS["staleness"].buckets), float("inf")]
    assert [s.value for s in buckets] == [0 if float(s.labels["le"]) < 3 else 1 for s in buckets]


# --- the exporter -------------------------------------------------------------------------------------------


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.fixture(params=["ps", "worker"])
def exporter(request):
    """The exporter of one side, served on a free loopback port: (metrics, health, base url)."""
    if request.param == "ps":
        from ps.metrics_http import serve_metrics
    else:
        from worker.metrics_http import serve_metrics
    metrics, health = MetricsRegistry("server"), Health("not registered with the scheduler at tcp://x:1 yet")
    server = serve_metrics(metrics, health, 0, "127.0.0.1")
    yield metrics, health, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_the_exporter_serves_metrics_health_and_nothing_else(exporter):
    metrics, health, base = exporter
    metrics.inc("pushes_total", 7)
    status, ctype, body = get(f"{base}/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert samples(body, "pscluster_pushes_total")[0].value == 7

    assert get(f"{base}/healthz")[::2] == (503, "not registered with the scheduler at tcp://x:1 yet\n")
    health.healthy()
    assert get(f"{base}/healthz")[::2] == (200, "ok\n")
    health.unhealthy("the store is gone\nreally")
    assert get(f"{base}/healthz")[::2] == (503, "the store is gone really\n")  # one line

    for path in ("/", "/metricsx", "/nope"):
        status, _ctype, body = get(f"{base}{path}")
        assert status == 404 and "pscluster_" not in body and len(body.splitlines()) == 1, (path, body)


# --- logs -----------------------------------------------------------------------------------------------------


def record(**extra) -> logging.LogRecord:
    rec = logging.makeLogRecord({"name": "pscluster.test", "levelno": logging.WARNING, "levelname": "WARNING",
                                 "msg": "scheduler %s is silent", "args": ("tcp://h:1",)})
    rec.__dict__.update(extra)
    return rec


def test_logfmt_lines_have_utc_timestamps():
    line = LogfmtFormatter("server").format(record(shard=3, why="a b"))
    m = re.fullmatch(r'ts=(\S+) level=warning role=server msg="scheduler tcp://h:1 is silent" shard=3 why="a b"',
                     line)
    assert m, line
    ts = datetime.fromisoformat(m.group(1))
    assert ts.utcoffset() == timedelta(0) and re.search(r"\.\d{3}\+00:00$", m.group(1))


def test_json_lines_are_one_object_with_the_extra_fields():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        rec = record(job="j1", step=4, loss=0.5, msg_extra=None)
        rec.exc_info = sys.exc_info()
    line = JsonFormatter("worker").format(rec)
    assert "\n" not in line
    obj = json.loads(line)
    assert list(obj)[:4] == ["ts", "level", "role", "msg"]
    assert obj["level"] == "warning" and obj["role"] == "worker" and obj["msg"] == "scheduler tcp://h:1 is silent"
    assert obj["job"] == "j1" and obj["step"] == 4 and obj["loss"] == 0.5 and obj["msg_extra"] is None
    assert "RuntimeError: boom" in obj["exc"]
    assert datetime.fromisoformat(obj["ts"]).utcoffset() == timedelta(0)


def test_the_format_comes_from_the_option_or_the_environment(monkeypatch):
    monkeypatch.delenv("PSCLUSTER_LOG_FORMAT", raising=False)
    assert log_format() == "logfmt" and log_format("json") == "json"
    monkeypatch.setenv("PSCLUSTER_LOG_FORMAT", "json")
    assert log_format() == "json" and log_format("logfmt") == "logfmt"
    monkeypatch.setenv("PSCLUSTER_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="xml"):
        log_format()


def test_setup_logging_writes_json_to_stderr(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root = logging.getLogger("pscluster")
    saved = root.handlers[:], root.level, root.propagate
    try:
        setup_logging("scheduler", "info", "json")
        logging.getLogger("pscluster.scheduler").info("serving", extra={"addr": "tcp://127.0.0.1:1"})
    finally:
        root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]
    obj = json.loads(stream.getvalue())
    assert (obj["role"], obj["msg"], obj["addr"]) == ("scheduler", "serving", "tcp://127.0.0.1:1")


# --- the dashboard --------------------------------------------------------------------------------------------


def exported_names() -> set[str]:
    """Every sample name a daemon of some role exports, as Prometheus stores it."""
    names = set()
    for role in ("scheduler", "server", "worker"):
        metrics = MetricsRegistry(role)
        for name, spec in METRICS.items():  # a series of each, so histograms show _bucket, _sum, _count
            if role in spec.roles and spec.labels and name != "info":
                labels = dict.fromkeys(spec.labels, "x")
                if spec.kind == "histogram":
                    metrics.histogram(name, **labels).observe(1)
                else:
                    metrics.inc(name, **labels) if spec.kind == "counter" else metrics.set(name, 1, **labels)
        names |= {s.name for f in text_string_to_metric_families(metrics.render()) for s in f.samples}
    return names


def panel_exprs(dashboard: dict) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            out += [(inner["title"], t["expr"]) for t in inner.get("targets", [])]
    return out


def test_the_dashboard_uses_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    known = exported_names()
    exprs = panel_exprs(dashboard)
    assert len(exprs) >= 10
    for title, expr in exprs:
        bare = re.sub(r'"[^"]*"', '""', expr)              # label values are not metric names
        used = set(re.findall(r"\b((?:pscluster|process|python)_[a-zA-Z0-9_]+)", bare))
        assert used, f"{title}: {expr} names no metric"
        assert used <= known, f"{title}: {sorted(used - known)} not exported"
        assert expr.count("(") == expr.count(")"), f"{title}: {expr}"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert set(re.findall(r"\bpscluster_[a-z0-9_]+", v["query"]["query"])) <= known
    # what the dashboard is for
    text = " ".join(expr for _title, expr in exprs)
    for name in ("pscluster_bytes_received_total", "pscluster_bytes_sent_total", "pscluster_step_seconds_bucket",
                 "pscluster_staleness_bucket", "pscluster_parked_pulls", "pscluster_loss", "pscluster_accuracy"):
        assert name in text, name
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
