"""deploy/: the compose file and Kubernetes manifests start the daemons the way psctl expects.

No Docker engine runs here, so these check the files' structure and that
every daemon command line they contain is one `psctl` accepts (parsed by
the real click commands, without running them).
"""
from __future__ import annotations

import shlex
from pathlib import Path

import click
import pytest
import yaml

from ps.cli import main

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def check_command(args: list[str]) -> None:
    """Parse `psctl ARGS` with the real CLI (no command runs); fail on a bad option."""
    command = main.get_command(click.Context(main), args[0])
    assert command is not None, f"psctl has no command {args[0]!r}"
    command.make_context(args[0], list(args[1:]))


def test_compose_services_run_valid_psctl_commands():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"scheduler", "server-0", "server-1", "worker", "submit"} <= set(services)
    for name in ("scheduler", "server-0", "server-1", "worker"):
        check_command(services[name]["command"])
    shard_ids = sorted(int(s["command"][s["command"].index("--shard-id") + 1])
                       for n, s in services.items() if n.startswith("server-"))
    assert shard_ids == list(range(len(shard_ids)))
    for name, svc in services.items():
        if name.startswith("server-"):
            assert f"tcp://{name}:6000" in svc["command"]  # advertised by its service name
    assert services["worker"]["deploy"]["replicas"] >= 1


def test_kubernetes_manifests_are_consistent():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "pscluster.yaml").read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("StatefulSet", "pscluster-scheduler"), ("StatefulSet", "pscluster-server"),
            ("Deployment", "pscluster-worker"), ("Service", "pscluster-scheduler"),
            ("Service", "pscluster-server")} <= kinds
    for doc in docs:
        if doc["kind"] in ("StatefulSet", "Deployment"):
            spec = doc["spec"]
            assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
            container = spec["template"]["spec"]["containers"][0]
            if container.get("command") == ["sh", "-c"]:
                line = container["args"][0].replace('"${HOSTNAME##*-}"', "0").replace("${HOSTNAME}", "pod-0")
                words = shlex.split(line)
                assert words[:2] == ["exec", "psctl"]
                check_command(words[2:])
            else:
                check_command(container["args"])


@pytest.mark.parametrize("path", sorted((DEPLOY / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_job_files_are_valid(path):
    from protocol.jobspec import load_job_file

    spec = load_job_file(str(path))
    assert spec["data"]["source"] == "sklearn:digits"


def test_a_bad_command_line_would_be_caught():
    with pytest.raises(click.UsageError):
        check_command(["server", "--shard-idd", "0"])
