"""A cluster across two hosts: two network namespaces joined by a veth pair.

Host A (namespace psa<pid>, 10.201.X.1) runs the scheduler and two
servers, host B (psb<pid>, 10.201.X.2) the workers and the submitting
client; each host reaches the other only over the veth pair, so a server
that advertised loopback, or listened on it, would never be reached. The
daemons are launched the ps-lite way (`psctl start`, DMLC_ROLE,
DMLC_PS_ROOT_URI/PORT, DMLC_INTERFACE or DMLC_NODE_HOST), with CURVE keys,
and a small job must succeed. The addresses exist only inside the
namespaces this test makes (README.md, "Running a cluster").

Needs root and `ip netns`; skipped with the reason otherwise. Every
process is stopped, and both namespaces deleted, whatever happens.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.procs import Proc, child_env, run_psctl
from worker.local_cluster import Child

ROOT = Path(__file__).resolve().parent.parent
IP_TIMEOUT_S = 20.0
READY_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 240.0
SCHEDULER_PORT = 9091      # namespaces are fresh: every port is free there
WORKER_METRICS_PORT = 9100
# Variables of the test's own environment that would change what the daemons do.
CLEAN_ENV = {name: "" for name in ("PSCLUSTER_SCHEDULER", "PSCLUSTER_CURVE_DIR", "PSCLUSTER_STATE_DIR",
                                   "DMLC_ROLE", "DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NODE_HOST",
                                   "DMLC_INTERFACE", "PSCLUSTER_SHARD_ID")}


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)


def must(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)}: {result.stderr.strip()}"


@dataclass
class Host:
    ns: str      # network namespace
    iface: str   # its end of the veth pair
    addr: str    # its address on the pair


@dataclass
class Hosts:
    a: Host
    b: Host


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    return None


def _kill_namespace_processes(ns: str) -> None:
    """SIGKILL whatever still runs in `ns` (only this test's processes run there), one pid at a time."""
    out = ip("netns", "pids", ns)
    for pid in out.stdout.split()[:1000] if out.returncode == 0 else []:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_namespaces() -> None:
    """Namespaces of this test whose test process is gone (killed before its clean-up ran)."""
    listing = ip("netns", "list")
    for line in listing.stdout.splitlines()[:1000] if listing.returncode == 0 else []:
        m = re.match(r"^(ps[ab](\d+))\b", line)
        if m and int(m.group(2)) != os.getpid() and not _alive(int(m.group(2))):
            _kill_namespace_processes(m.group(1))
            ip("netns", "del", m.group(1))


@pytest.fixture
def hosts():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    _remove_stale_namespaces()
    pid = os.getpid()
    subnet = f"10.201.{pid % 200 + 20}"
    a = Host(f"psa{pid}", f"pva{pid}", f"{subnet}.1")
    b = Host(f"psb{pid}", f"pvb{pid}", f"{subnet}.2")
    made: list[str] = []
    try:
        for host in (a, b):
            result = ip("netns", "add", host.ns)
            if result.returncode != 0:
                pytest.skip(f"ip netns add failed: {result.stderr.strip()}")
            made.append(host.ns)
        must(ip("link", "add", a.iface, "type", "veth", "peer", "name", b.iface))
        for host in (a, b):
            must(ip("link", "set", host.iface, "netns", host.ns))
            must(ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", host.iface))
            must(ip("-n", host.ns, "link", "set", host.iface, "up"))
            must(ip("-n", host.ns, "link", "set", "lo", "up"))
        yield Hosts(a, b)
    finally:
        for ns in made:
            _kill_namespace_processes(ns)
            ip("netns", "del", ns)  # takes its end of the veth pair, and so the pair, with it
        if made and ip("link", "show", a.iface).returncode == 0:  # a pair that never moved into A
            ip("link", "del", a.iface)


class NsProc(Proc):
    """A Proc that also gets SIGTERM if this test process dies (`ip netns exec` execs, so the daemon does)."""

    def __init__(self, args: list[str], *, env: dict, cwd: str):
        self.stderr_file = tempfile.NamedTemporaryFile(prefix="psctl-netns-", suffix=".log", delete=False)
        try:
            Child.__init__(self, args, stderr=self.stderr_file, env=env, cwd=cwd, die_with_parent=True)
        except BaseException:
            self._remove_log()
            raise


class Daemons:
    """Processes started inside namespaces; `stop()` ends them all."""

    def __init__(self):
        self.procs: list[Proc] = []

    def start(self, host: Host, *args: str, env: dict, ready: bool = True) -> Proc:
        proc = NsProc(["ip", "netns", "exec", host.ns, sys.executable, "-m", "ps.cli", *args],
                      env={**CLEAN_ENV, **env}, cwd=str(ROOT))
        self.procs.append(proc)
        if ready:
            proc.wait_ready(READY_TIMEOUT_S)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
        self.procs.clear()


@pytest.fixture
def daemons():
    group = Daemons()
    try:
        yield group
    finally:
        group.stop()


def run_in(host: Host, *args: str, env: dict, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """One bounded command inside `host`'s namespace."""
    return subprocess.run(["ip", "netns", "exec", host.ns, *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env({**CLEAN_ENV, **env}), cwd=str(ROOT))


def psctl_in(host: Host, *args: str, env: dict, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return run_in(host, sys.executable, "-m", "ps.cli", *args, env=env, timeout=timeout)


def small_job(tmp_path: Path) -> str:
    spec = yaml.safe_load((ROOT / "deploy/examples/digits-mlp.yaml").read_text())
    spec.update(name="netns", workers=2, steps=40, eval_every=20)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def make_keys(directory: Path) -> str:
    for role in ("scheduler", "server", "worker", "admin"):
        result = run_psctl("keys", "generate", str(directory), "--role", role, timeout=60)
        assert result.returncode == 0, result.stderr
    return str(directory)


def test_a_dmlc_launch_across_two_hosts_trains_with_curve(hosts, daemons, tmp_path):
    a, b = hosts.a, hosts.b
    keys = make_keys(tmp_path / "keys")
    dmlc = {"DMLC_PS_ROOT_URI": a.addr, "DMLC_PS_ROOT_PORT": str(SCHEDULER_PORT)}

    # Host A: the scheduler (state under XDG_STATE_HOME: `psctl start` gives it a directory) ...
    sched = daemons.start(a, "start", env={**dmlc, "DMLC_ROLE": "scheduler", "PSCLUSTER_CURVE_DIR": keys,
                                           "XDG_STATE_HOME": str(tmp_path / "state")})
    assert sched.ready["addr"] == f"tcp://0.0.0.0:{SCHEDULER_PORT}" and sched.ready["curve"] is True, sched.ready
    assert sched.ready["state_dir"] == str(tmp_path / "state" / "pscluster" / f"scheduler-{SCHEDULER_PORT}")

    # ... a server that finds its address from DMLC_INTERFACE, another from DMLC_NODE_HOST.
    servers = [daemons.start(a, "start", "--curve-dir", keys, env={**dmlc, "DMLC_ROLE": "server",
                                                                   "DMLC_INTERFACE": a.iface}),
               daemons.start(a, "server", "--curve-dir", keys, env={**dmlc, "DMLC_NODE_HOST": a.addr})]
    for proc in servers:
        facts = proc.ready
        port = facts["addr"].rsplit(":", 1)[1]
        assert facts["addr"].startswith("tcp://0.0.0.0:") and port != "0", facts  # every interface
        assert facts["advertise"] == f"tcp://{a.addr}:{port}", facts              # reachable from B
    assert sorted(proc.ready["shard"] for proc in servers) == [0, 1]

    # Host B: two workers, one serving metrics (on every interface: its scheduler is elsewhere).
    worker_env = {**dmlc, "DMLC_ROLE": "worker", "PSCLUSTER_CURVE_DIR": keys}
    daemons.start(b, "start", "--metrics-port", str(WORKER_METRICS_PORT), env=worker_env)
    daemons.start(b, "start", env=worker_env)

    result = psctl_in(b, "submit", small_job(tmp_path), "--wait", "--json",
                      env={**dmlc, "PSCLUSTER_CURVE_DIR": keys}, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, result.stderr + "".join(p.stderr() for p in daemons.procs)
    summary = json.loads(result.stdout)
    assert summary["status"] == "succeeded", summary

    status = psctl_in(b, "status", summary["job"], "--json", env={**dmlc, "PSCLUSTER_CURVE_DIR": keys})
    assert status.returncode == 0, status.stderr
    shards = json.loads(status.stdout)["shards"]
    assert len(shards) == 2 and all(f"tcp://{a.addr}:" in json.dumps(s) for s in shards), shards

    # Host A scrapes the worker on host B.
    scrape = run_in(a, sys.executable, "-c", "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
                    f"'http://{b.addr}:{WORKER_METRICS_PORT}/metrics', timeout=10).read().decode())", env={})
    assert scrape.returncode == 0 and "pscluster_steps_total" in scrape.stdout, scrape.stderr


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The one-sentence error a command exited with (after any log lines), no traceback."""
    assert result.returncode != 0, result.stdout
    err = result.stderr.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("Error: "), err
    return err.splitlines()[-1]


def test_across_hosts_without_curve_is_refused_and_says_what_it_needs(hosts, tmp_path):
    a, b = hosts.a, hosts.b
    dmlc = {"DMLC_PS_ROOT_URI": a.addr, "DMLC_PS_ROOT_PORT": str(SCHEDULER_PORT)}
    err = one_line_error(psctl_in(a, "start", env={**dmlc, "DMLC_ROLE": "scheduler",
                                                   "PSCLUSTER_STATE_DIR": str(tmp_path / "s")}))
    assert f"tcp://0.0.0.0:{SCHEDULER_PORT}" in err and f"DMLC_PS_ROOT_URI={a.addr}" in err, err
    assert "across machines" in err and "--curve-dir" in err and "--insecure" in err, err
    err = one_line_error(psctl_in(b, "start", env={**dmlc, "DMLC_ROLE": "server"}))
    assert "tcp://0.0.0.0:0" in err and "across machines" in err and "--curve-dir" in err, err
    assert "--insecure" in err, err
    # A misnamed interface is an error, not a silently wrong address (refused before it reaches the scheduler).
    err = one_line_error(psctl_in(b, "start", "--insecure", "--shard-id", "0",
                                  env={**dmlc, "DMLC_ROLE": "server", "DMLC_INTERFACE": "nope0"}))
    assert "DMLC_INTERFACE=nope0" in err and "no such interface" in err, err


def test_across_hosts_with_insecure_and_a_loopback_launch_stays_on_loopback(hosts, daemons, tmp_path):
    a, b = hosts.a, hosts.b
    # One machine: DMLC_PS_ROOT_URI on loopback keeps every daemon there, without CURVE or --insecure.
    local = {"DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": str(SCHEDULER_PORT)}
    sched = daemons.start(b, "start", env={**local, "DMLC_ROLE": "scheduler",
                                           "PSCLUSTER_STATE_DIR": str(tmp_path / "local")})
    assert sched.ready["addr"] == f"tcp://127.0.0.1:{SCHEDULER_PORT}", sched.ready
    server = daemons.start(b, "start", env={**local, "DMLC_ROLE": "server"})
    assert server.ready["advertise"].startswith("tcp://127.0.0.1:"), server.ready

    # Across hosts with --insecure: no DMLC_NODE_HOST or DMLC_INTERFACE, the route to the scheduler decides.
    dmlc = {"DMLC_PS_ROOT_URI": a.addr, "DMLC_PS_ROOT_PORT": str(SCHEDULER_PORT)}
    daemons.start(a, "start", "--insecure", env={**dmlc, "DMLC_ROLE": "scheduler",
                                                 "PSCLUSTER_STATE_DIR": str(tmp_path / "s")})
    far = daemons.start(b, "start", "--insecure", env={**dmlc, "DMLC_ROLE": "server"})
    assert far.ready["advertise"] == f"tcp://{b.addr}:{far.ready['addr'].rsplit(':', 1)[1]}", far.ready
