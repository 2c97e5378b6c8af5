"""The layout is honest: protocol/ has no sockets; ps/ and worker/ never import each other;
only the modules that own sockets import zmq (the command line none); no import cycles.

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
    # prometheus_client: protocol/metrics.py builds the registry and the WSGI app; it opens no socket.
    allowed = {"numpy", "msgpack", "yaml", "prometheus_client", "protocol", "__future__"} | set(sys.stdlib_module_names)
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
    # the commands of `psctl --help` (ps/cli's own five and every psctl.commands entry of setup.cfg), and the benchmarks
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    plugged = [line for line in cfg["options.entry_points"]["psctl.commands"].splitlines() if "=" in line]
    benches = [line for line in cfg["options.entry_points"]["psctl.bench"].splitlines() if "=" in line]
    assert out.stdout.split() == [str(5 + len(plugged)), str(len(benches))]


def test_importing_the_cli_loads_neither_worker_nor_cupy():
    code = "import sys, ps.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('worker', 'cupy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_only_daemon_loops_and_clients_own_sockets():
    """zmq is imported only by the modules that own sockets: never by the command line (ps/cli, worker/cli)."""
    owners = {"ps/shard.py", "ps/scheduler.py", "ps/shard_calls.py", "ps/transport.py", "ps/router.py",
              "worker/client.py", "worker/flight.py", "worker/transport.py",
              "worker/sched_client.py", "worker/heartbeat.py", "worker/daemon.py",
              "worker/bench/raw_echo.py"}  # the raw pyzmq reference of `psctl bench pushpull`
    users = {str(p.relative_to(ROOT)) for pkg in ("ps", "worker") for p in modules(pkg)
             if any(roots(n) == "zmq" for n, _ in imports_of(p))}
    assert users <= owners, users - owners


# --- import cycles ----------------------------------------------------------------

PACKAGES = ("protocol", "ps", "worker")


def module_name(path: Path) -> str:
    """protocol/codec.py -> protocol.codec; worker/nn/__init__.py -> worker.nn."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports, anywhere in its source (functions included).

    `import a.b` is an edge to a.b; `from X import Y` to the module X.Y when
    there is one (a submodule), else to X; relative imports are resolved
    against the importing module's package. Imports of other packages are left out.
    """
    paths = {module_name(p): p for pkg in packages for p in modules(pkg)}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in paths)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    edges.add(target if target in paths else base)
        graph[name] = {m for m in edges if m in paths and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None if it has none (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"z", "w"}, "z": set(), "w": {"y"}}) == ["w", "y", "w"]
    assert find_cycle({"self": {"self"}}) == ["self", "self"]


def test_the_import_graph_sees_lazy_and_from_imports():
    graph = import_graph()
    assert "worker.local_cluster" in graph["worker.cli.cmd_run"]            # inside the command function
    assert "worker.bench.raw_echo" in graph["worker.bench.pushpull"]        # from worker.bench.raw_echo import ...
    assert "protocol.jobstate" in graph["worker.cli.cmd_jobs"]              # from a module, a name
    assert "worker.bench.nn" in graph["worker.cli.cmd_bench_nn"]


def test_no_import_cycles():
    """No module of protocol/, ps/ or worker/ imports itself through others, not even lazily."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
