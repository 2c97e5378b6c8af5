"""The layout is honest: protocol/ has no sockets; ps/ and worker/ never import each other.

Checked on the source (every import statement of every module), so a lazy
import inside a function counts too, the command line included: ps/cli
hosts `psctl` and the server-side commands, worker/cli brings the rest as
entry-point plug-ins declared in setup.cfg.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at module level?) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in top_level))
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def roots(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("path", modules("protocol"), ids=lambda p: str(p.relative_to(ROOT)))
def test_protocol_has_no_sockets_and_no_sides(path):
    allowed = {"numpy", "msgpack", "yaml", "protocol", "__future__"} | set(sys.stdlib_module_names)
    bad = [name for name, _ in imports_of(path) if roots(name) not in allowed or roots(name) in ("socket", "ssl")]
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", modules("ps"), ids=lambda p: str(p.relative_to(ROOT)))
def test_ps_never_imports_worker(path):
    assert [n for n, _ in imports_of(path) if roots(n) == "worker"] == []


@pytest.mark.parametrize("path", modules("worker"), ids=lambda p: str(p.relative_to(ROOT)))
def test_worker_never_imports_ps(path):
    assert [n for n, _ in imports_of(path) if roots(n) == "ps"] == []


def test_every_plugged_in_command_loads():
    """Each entry point of setup.cfg names a real click command (run in a fresh process)."""
    code = ("import click, ps.cli as c\n"
            "for group, name in [(c.main, n) for n in c.main.list_commands(None)] + "
            "[(c.bench, n) for n in c.bench.list_commands(None)]:\n"
            "    assert isinstance(group.get_command(click.Context(group), name), click.Command), name\n"
            "print(len(c.main.list_commands(None)), len(c.bench.list_commands(None)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["12", "3"]


def test_importing_the_cli_loads_neither_worker_nor_cupy():
    code = "import sys, ps.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('worker', 'cupy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_only_daemon_loops_and_clients_own_sockets():
    """zmq is imported only by the modules that own sockets."""
    owners = {"ps/shard.py", "ps/scheduler.py", "ps/shardlinks.py", "ps/transport.py", "ps/router.py",
              "worker/client.py",
              "worker/sched_client.py", "worker/heartbeat.py", "worker/daemon.py"}
    users = {str(p.relative_to(ROOT)) for pkg in ("ps", "worker") for p in modules(pkg)
             if "cli" not in p.parts and any(roots(n) == "zmq" for n, _ in imports_of(p))}
    # (the benchmarks' raw pyzmq reference in worker/cli is the one socket owner outside these)
    assert users <= owners, users - owners
