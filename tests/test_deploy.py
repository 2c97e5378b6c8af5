"""deploy/: the compose file and Kubernetes manifests start the daemons the way psctl expects.

No Docker engine or Kubernetes runs here, so these check the files'
structure, that every daemon command line they contain is one `psctl`
accepts (parsed by the real click commands, without running them), and the
keys: every daemon runs with CURVE, and each container, its mounts laid out
on disk from keys `psctl keys generate` made (compose: the `keys` service's
own script run here; Kubernetes: the Secrets deploy/k8s/create-secrets.sh
makes, through a stand-in kubectl), finds its own secret key and no other
(the admin key only where jobs are submitted). `docker-compose config`
validates the compose file when the client is installed.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from protocol.endpoints import check_protected
from protocol.keys import ROLES, KeyRing
from ps.cli import main

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DAEMONS = ("scheduler", "server", "worker")


def check_command(args: list[str]) -> None:
    """Parse `psctl ARGS` with the real CLI (no command runs); fail on a bad option."""
    command = main.get_command(click.Context(main), args[0])
    assert command is not None, f"psctl has no command {args[0]!r}"
    command.make_context(args[0], list(args[1:]))


def test_compose_services_run_valid_psctl_commands():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"keys", "scheduler", "server-0", "server-1", "worker", "submit"} <= set(services)
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
    docs = k8s_docs()
    kinds = {(d["kind"], d["metadata"].get("name", d["metadata"].get("generateName"))) for d in docs}
    assert {("StatefulSet", "pscluster-scheduler"), ("StatefulSet", "pscluster-server"),
            ("Deployment", "pscluster-worker"), ("Service", "pscluster-scheduler"),
            ("Service", "pscluster-server")} <= kinds
    for doc in docs:
        if doc["kind"] in ("StatefulSet", "Deployment"):
            spec = doc["spec"]
            assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
            container = spec["template"]["spec"]["containers"][0]
            check_command(psctl_args(container))


# --- helpers -----------------------------------------------------------------------

def compose_services() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]


def k8s_docs() -> list[dict]:
    return [d for name in ("pscluster.yaml", "submit.yaml")
            for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


def pod_templates() -> dict[str, dict]:
    """role label -> pod template of every StatefulSet, Deployment and Job."""
    return {d["spec"]["template"]["metadata"]["labels"]["role"]: d["spec"]["template"]
            for d in k8s_docs() if d["kind"] in ("StatefulSet", "Deployment", "Job")}


def psctl_args(container: dict) -> list[str]:
    """The psctl arguments a container runs (through `sh -c "exec psctl ..."` or as the image's entry point)."""
    if container.get("command") == ["sh", "-c"]:
        line = container["args"][0].replace('"${HOSTNAME##*-}"', "0").replace("${HOSTNAME}", "pod-0")
        words = shlex.split(line)
        assert words[:2] == ["exec", "psctl"]
        return words[2:]
    return [re.sub(r"\$\((\w+)\)", r"\1", a) for a in container["args"]]  # $(VAR): Kubernetes expands it


def curve_dir_of(args: list[str], env: dict) -> str | None:
    """--curve-dir from the command line, else PSCLUSTER_CURVE_DIR."""
    if "--curve-dir" in args:
        return args[args.index("--curve-dir") + 1]
    return env.get("PSCLUSTER_CURVE_DIR")


def generate_keys(directory: Path) -> None:
    for role in ROLES:
        result = CliRunner().invoke(main, ["keys", "generate", str(directory), "--role", role])
        assert result.exit_code == 0, result.output


def secret_files(root: Path) -> set[str]:
    """ROLE/NAME.key_secret of every secret key under `root`."""
    return {str(p.relative_to(root)) for p in root.rglob("*.key_secret")}


def check_key_view(keys: Path, role: str) -> None:
    """A curve dir as a container sees it: its role's key pair, every role's public key, no other secret."""
    ring = KeyRing(keys)
    ring.own(role)          # exactly one secret key of its role, readable
    ring.scheduler_key()    # every process talks to the scheduler
    assert {r for r in ROLES if ring.names(r)} == set(ROLES), f"{role}: public keys missing"
    assert secret_files(keys) == {f"{role}/{role}.key_secret"}, f"{role} sees {secret_files(keys)}"


# --- CURVE in compose ---------------------------------------------------------------

def test_compose_daemons_run_with_curve_after_the_keys_exist():
    services = compose_services()
    assert services["keys"]["restart"] == "no"
    daemons = [n for n, s in services.items() if s.get("command") and s["command"][0] in DAEMONS]
    assert sorted(daemons) == ["scheduler", "server-0", "server-1", "worker"]
    for name in [*daemons, "submit"]:
        svc = services[name]
        assert curve_dir_of(svc.get("command") or [], svc.get("environment") or {}) == "/keys", name
        assert svc["depends_on"]["keys"] == {"condition": "service_completed_successfully"}, name
    for name in daemons:  # 0.0.0.0 is allowed because CURVE is on, and only because of it
        command = services[name]["command"]
        if command[0] != "worker":  # workers listen on no socket
            bind = command[command.index("--bind") + 1]
            check_protected(bind, "--bind", curve=True, insecure=False)
            with pytest.raises(ValueError):
                check_protected(bind, "--bind", curve=False, insecure=False)


def test_compose_admin_key_is_mounted_only_for_submit():
    services = compose_services()
    volumes = {n: [v.split(":")[0] for v in s.get("volumes", [])] for n, s in services.items()}
    assert {n for n, vs in volumes.items() if "keys-admin" in vs} == {"keys", "submit"}
    for name, svc in services.items():
        if name == "keys":
            continue
        role = "admin" if name == "submit" else svc["command"][0]
        assert {v for v in volumes[name] if v.startswith("keys-")} == {"keys-public", f"keys-{role}"}, name


def _mounts(svc: dict) -> list[tuple[str, str]]:
    """(volume, path in the container) of every volume mount, outer paths first."""
    pairs = [tuple(v.split(":")[:2]) for v in svc.get("volumes", [])]
    return sorted(pairs, key=lambda p: len(Path(p[1]).parts))


def test_compose_keys_service_makes_each_container_the_curve_dir_it_needs(tmp_path):
    """Run the keys service's script here (twice: the second run keeps the keys) over stand-in
    volumes, then lay out each container's mounts and load its keys as the daemon would."""
    services = compose_services()
    vols, fake_root = tmp_path / "volumes", tmp_path / "root"
    fake_root.mkdir()
    keys_svc = services["keys"]
    assert keys_svc["entrypoint"] == ["sh", "-c"]
    for volume, path in _mounts(keys_svc):
        (vols / volume).mkdir(parents=True, exist_ok=True)
        link = fake_root / path.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(vols / volume)
    tops = sorted({Path(path).parts[1] for _, path in _mounts(keys_svc)})
    script = keys_svc["command"][0].replace("$$", "$")
    script = re.sub(rf"(?<=\s)/({'|'.join(tops)})\b", lambda m: f"{fake_root}/{m.group(1)}", script)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    before = None
    for _ in range(2):
        done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        now = {p: p.read_bytes() for p in vols.rglob("*.key*")}
        assert before is None or now == before  # keys already there are kept
        before = now
    for name, svc in services.items():
        if name == "keys":
            continue
        view = tmp_path / "views" / name
        for volume, path in _mounts(svc):
            if not path.startswith("/keys"):
                continue
            target = view / path.lstrip("/")
            shutil.rmtree(target, ignore_errors=True)  # a mount hides what was at its path
            shutil.copytree(vols / volume, target)
        check_key_view(view / "keys", "admin" if name == "submit" else svc["command"][0])


def test_docker_compose_config_passes():
    client = shutil.which("docker-compose")
    if client is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    done = subprocess.run([client, "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --- CURVE on Kubernetes ------------------------------------------------------------

def _env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _volume_secrets(volume: dict) -> list[str]:
    if "secret" in volume:
        return [volume["secret"]["secretName"]]
    return [src["secret"]["name"] for src in volume.get("projected", {}).get("sources", []) if "secret" in src]


def test_kubernetes_pods_mount_only_their_own_secret_key():
    pods = pod_templates()
    assert set(pods) == {*DAEMONS, "submit"}
    for role, pod in pods.items():
        (container,) = pod["spec"]["containers"]
        args = psctl_args(container)
        assert args[0] == ("submit" if role == "submit" else role)
        assert curve_dir_of(args, _env(container)) == "/etc/pscluster/keys", role
        check_command(args)
        secrets = {s for v in pod["spec"]["volumes"] for s in _volume_secrets(v)}
        own = "admin" if role == "submit" else role
        assert {s for s in secrets if s.startswith("pscluster-keys-")} == {f"pscluster-keys-{own}"}, role
        assert {s for s in secrets if s.startswith("pscluster-public-")} == {f"pscluster-public-{r}" for r in ROLES}
        if role != "worker":
            bind = args[args.index("--bind") + 1] if "--bind" in args else None
            if bind:
                check_protected(bind, "--bind", curve=True, insecure=False)


def test_kubernetes_secrets_from_a_key_dir_give_each_pod_its_curve_dir(tmp_path):
    """create-secrets.sh through a stand-in kubectl, then each pod's mounts laid out from those Secrets."""
    keydir = tmp_path / "keys"
    generate_keys(keydir)
    bin_dir, log = tmp_path / "bin", tmp_path / "kubectl.log"
    bin_dir.mkdir()
    fake = bin_dir / "kubectl"
    fake.write_text('#!/bin/sh\nif [ "$1" = create ]; then echo "$@"; else cat >> "$KUBECTL_LOG"; '
                    'echo "APPLY $*" >> "$KUBECTL_LOG"; fi\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", KUBECTL_LOG=str(log))
    done = subprocess.run(["bash", str(DEPLOY / "k8s" / "create-secrets.sh"), str(keydir), "-n", "ml"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    secrets: dict[str, list[Path]] = {}
    lines = log.read_text().splitlines()
    for line in lines[::2]:
        words = line.split()
        assert words[:3] == ["create", "secret", "generic"] and words[-5:] == ["--dry-run=client", "-o", "yaml",
                                                                             "-n", "ml"], line
        secrets[words[3]] = [Path(w.removeprefix("--from-file=")) for w in words[4:-5]]
    assert all(line == "APPLY apply -n ml -f -" for line in lines[1::2])
    for role in ROLES:
        assert secrets[f"pscluster-public-{role}"] == [keydir / role / f"{role}.key"]
        assert secrets[f"pscluster-keys-{role}"] == [keydir / role / f"{role}.key_secret"]
    for role, pod in pod_templates().items():
        (container,) = pod["spec"]["containers"]
        base = _env(container)["PSCLUSTER_CURVE_DIR"]
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        view = tmp_path / "pods" / role
        for mount in container["volumeMounts"]:
            if not mount["mountPath"].startswith(base + "/"):
                continue
            assert mount.get("readOnly") is True
            target = view / Path(mount["mountPath"]).relative_to(base)
            target.mkdir(parents=True)
            for secret in _volume_secrets(volumes[mount["name"]]):
                for path in secrets[secret]:  # a Secret's files appear under their base names
                    shutil.copy(path, target / path.name)
        check_key_view(view, "admin" if role == "submit" else role)


def test_kubernetes_network_policy_admits_only_the_cluster_to_the_daemons():
    docs = k8s_docs()
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    selector = spec["podSelector"]["matchLabels"]
    pods = pod_templates()
    for role, pod in pods.items():
        assert selector.items() <= pod["metadata"]["labels"].items(), f"the policy does not select {role}"
    daemon_ports = {p["containerPort"] for role in ("scheduler", "server")
                    for p in pods[role]["spec"]["containers"][0]["ports"] if p["name"] == "zmq"}
    assert daemon_ports == {5555, 6000}
    every_port = {p["containerPort"] for pod in pods.values() for p in pod["spec"]["containers"][0].get("ports", [])}
    covered = set()
    for rule in spec["ingress"]:
        assert rule.get("from"), "a rule without `from` admits everyone"
        ports = {p["port"] for p in rule["ports"]}
        assert all(p.get("protocol", "TCP") == "TCP" for p in rule["ports"])
        covered |= ports
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            if ports & daemon_ports:  # the daemons' sockets: only this cluster's pods
                assert set(peer) == {"podSelector"}, peer
                for pod in pods.values():
                    assert peer["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert covered == every_port  # nothing a daemon listens on is left blocked by mistake


@pytest.mark.parametrize("path", sorted((DEPLOY / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_job_files_are_valid(path):
    from protocol.jobspec import load_job_file

    spec = load_job_file(str(path))
    assert spec["data"]["source"] == "sklearn:digits"


def test_a_bad_command_line_would_be_caught():
    with pytest.raises(click.UsageError):
        check_command(["server", "--shard-idd", "0"])
