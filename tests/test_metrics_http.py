"""Every daemon's exporter, /healthz and READY, as real processes on loopback.

/metrics parses as Prometheus parses it, with the types of the table
(protocol/metrics.py); a job's series end with the job (on the worker when
its part ends, on a shard when the table is dropped); /healthz and READY
wait for the scheduler, and a daemon that cannot reach it says so in its log.
"""
from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import time
from datetime import datetime, timedelta

import zmq
from prometheus_client.parser import text_string_to_metric_families

from protocol.codec import decode, encode
from protocol.messages import Drop, Ok
from protocol.metrics import JOB_LABEL, METRICS, exported_name
from tests.procs import PSCTL, run_psctl
from tests.test_jobs import job_file, psctl_json, wait_until
from tests.test_metrics import get
from worker.local_cluster import Child

READY_TIMEOUT_S = 60.0
LOG_TIMEOUT_S = 30.0
RECV_TIMEOUT_MS = 10_000


class LoggedChild(Child):
    """A psctl daemon whose stderr (its log) is read line by line here, with bounded waits."""

    def __init__(self, *args: str, env: dict | None = None):
        super().__init__([PSCTL, *args], stderr=subprocess.PIPE, env=env)
        self._err = b""
        self.log: list[str] = []

    def wait_log(self, match, timeout: float = LOG_TIMEOUT_S) -> str:
        """The first log line (from the start) for which `match(line)` is true; AssertionError if none comes."""
        for line in self.log:
            if match(line):
                return line
        deadline = time.monotonic() + timeout
        fd = self.popen.stderr.fileno()
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([fd], [], [], left)
            chunk = os.read(fd, 65536) if readable else b""
            if not chunk:
                break
            self._err += chunk
            *lines, self._err = self._err.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                self.log.append(line)
                if match(line):
                    return line
        raise AssertionError(f"{' '.join(self.args)}: no such log line within {timeout:g}s:\n" + "\n".join(self.log))

    def stop(self, timeout: float = 10.0) -> None:
        try:
            super().stop(timeout)
        finally:
            self.popen.stderr.close()


def start_logged(procs, *args: str, env: dict | None = None) -> LoggedChild:
    child = LoggedChild(*args, env=env)
    procs.procs.append(child)  # reaped with the test's other processes
    return child


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> str:
    status, _ctype, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, body
    return body


def sample_names(page: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(page) for s in f.samples}


def job_series(page: str, job: str) -> list[str]:
    return [s.name for f in text_string_to_metric_families(page) for s in f.samples if s.labels.get(JOB_LABEL) == job]


def check_page(page: str, role: str) -> None:
    """The page parses; each metric of the role is there with the table's type; process metrics too."""
    found = {f.name: f.type for f in text_string_to_metric_families(page)}
    for name, spec in METRICS.items():
        if role in spec.roles:
            assert found.get(exported_name(name).removesuffix("_total")) == spec.kind, (role, name)
    assert found.get("process_cpu_seconds") == "counter" and found.get("process_resident_memory_bytes") == "gauge"


def test_every_daemon_exports_typed_metrics_and_a_jobs_series_end_with_it(procs, tmp_path):
    sched = procs.start("scheduler", "--state-dir", str(tmp_path / "s"), "--metrics-port", "0")
    addr = sched.ready["addr"]
    server = procs.server(0, "--scheduler", addr, "--metrics-port", "0")
    worker = procs.start("worker", "--scheduler", addr, "--metrics-port", "0")
    ports = {"scheduler": sched.ready["metrics_port"], "server": server.ready["metrics_port"],
             "worker": worker.ready["metrics_port"]}
    for role, port in ports.items():
        check_page(scrape(port), role)
        assert get(f"http://127.0.0.1:{port}/healthz")[::2] == (200, "ok\n"), role  # READY: healthy
        status, _ctype, body = get(f"http://127.0.0.1:{port}/nothing-here")
        assert status == 404 and "pscluster_" not in body, role

    # a job long enough to watch: its series appear on the worker and the shard while it runs
    job = psctl_json("submit", job_file(tmp_path, workers=1, steps=100_000), "--scheduler", addr)["job"]
    wait_until(lambda: "pscluster_steps_total" in job_series(scrape(ports["worker"]), job), what="worker steps")
    page = scrape(ports["worker"])
    kinds = {f.name: f.type for f in text_string_to_metric_families(page)}
    assert (kinds["pscluster_steps"], kinds["pscluster_loss"], kinds["pscluster_step_seconds"]) == \
        ("counter", "gauge", "histogram")
    assert {"pscluster_steps_total", "pscluster_examples_total", "pscluster_loss", "pscluster_accuracy",
            "pscluster_step_seconds_bucket", "pscluster_staleness_seen_count"} <= set(job_series(page, job))
    assert "pscluster_staleness_bucket" in job_series(scrape(ports["server"]), job)  # applied before the reply

    # cancelled: the worker's part ends, and with it the job's series there (before the assignment is counted)
    result = run_psctl("cancel", job, "--scheduler", addr)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: "pscluster_assignments_total" in sample_names(scrape(ports["worker"])),
               what="the worker's assignment to end")
    assert job_series(scrape(ports["worker"]), job) == []
    wait_until(lambda: "pscluster_jobs_finished_total" in sample_names(scrape(ports["scheduler"])),
               what="the job to end")
    assert job_series(scrape(ports["scheduler"]), job) == []

    # the shard keeps the job's table (for export) until it is dropped; then its series go too
    assert job_series(scrape(ports["server"]), job) != []
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
        sock.connect(server.ready["addr"])
        sock.send_multipart(encode(Drop(rid=1, job=job)))
        reply = decode(sock.recv_multipart())
        sock.close(0)
    finally:
        ctx.destroy(linger=0)
    assert isinstance(reply, Ok) and reply.body["dropped"] is True
    assert job_series(scrape(ports["server"]), job) == []
    assert "pscluster_pushes_total" in sample_names(scrape(ports["server"]))


def test_health_and_ready_wait_for_the_scheduler(procs, tmp_path):
    """A server and a worker started before their scheduler: 503 and no READY, a warning naming it;
    once it is up, READY and 200. The scheduler logs JSON (from the environment), the server logfmt."""
    addr = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there yet
    server = start_logged(procs, "server", "--shard-id", "0", "--scheduler", addr, "--metrics-port", "0")
    worker = start_logged(procs, "worker", "--scheduler", addr, "--metrics-port", "0", "--log-format", "json")
    health = {}
    for name, child in (("server", server), ("worker", worker)):
        served = child.wait_log(lambda line: "exporter serving" in line)
        health[name] = re.search(r"http://127\.0\.0\.1:(\d+)/healthz", served)
        child.wait_log(lambda line: "warning" in line and addr in line)  # says it cannot reach the scheduler
        status, _ctype, body = get(health[name].group(0))
        assert status == 503 and addr in body, (name, body)
        assert child.readline(0.01) is None, f"{name} said READY before it registered"

    sched = start_logged(procs, "scheduler", "--bind", addr, "--state-dir", str(tmp_path / "s"),
                         env={"PSCLUSTER_LOG_FORMAT": "json"})
    sched.wait_ready(READY_TIMEOUT_S)
    for name, child in (("server", server), ("worker", worker)):
        ready = child.wait_ready(READY_TIMEOUT_S)
        assert ready["metrics_port"] == int(health[name].group(1))
        assert get(health[name].group(0))[::2] == (200, "ok\n"), name
        child.wait_log(lambda line: "registered" in line)

    # the logs: logfmt (the server) and JSON (the worker by option, the scheduler by environment), UTC
    sched.wait_log(lambda line: "server registered" in line)
    for line in server.log:
        m = re.match(r"ts=(\S+) level=\w+ role=server ", line)
        assert m and datetime.fromisoformat(m.group(1)).utcoffset() == timedelta(0), line
    for role, child in (("worker", worker), ("scheduler", sched)):
        for line in child.log:
            obj = json.loads(line)
            assert obj["role"] == role and obj["level"] in ("info", "warning") and obj["msg"], line
            assert datetime.fromisoformat(obj["ts"]).utcoffset() == timedelta(0), line
