"""deploy/k8s: the Kubernetes manifests, checked offline (no cluster runs here).

Every manifest, and what `kubectl kustomize deploy/k8s` renders, passes
`kubernetes-validate --strict`; then the properties an operator relies on:
probes on /healthz on every daemon, the pod and container securityContext,
requests and limits, the app.kubernetes.io labels, headless Services for the
StatefulSets, PodDisruptionBudgets, a pinned image tag, the GPU worker, the
submit Job reading its job file from a ConfigMap (deploy/k8s/submit.sh makes
a fresh one per submission, run here through a stand-in kubectl), CURVE keys
per pod (the Secrets deploy/k8s/create-secrets.sh makes, also through a
stand-in kubectl: each pod finds its own secret key and no other, the admin
key only in the submit Job) and the NetworkPolicy. Every container's command
line is parsed by the real click commands.
"""
from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from protocol.endpoints import check_protected, parse_size
from protocol.keys import ROLES
from tests.test_deploy import DAEMONS, USER_ID, check_command, check_key_view, generate_keys

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
FILES = ("pscluster.yaml", "submit.yaml")
# The schemas validated against: the oldest Kubernetes the manifests claim (the
# submit Job's uid label is 1.27's; 1.30 is the oldest release still widely run).
KUBERNETES_VERSION = "1.30.0"
NAME_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")
LABELS = (*NAME_LABELS, "app.kubernetes.io/part-of", "app.kubernetes.io/version")
WORKLOADS = ("StatefulSet", "Deployment", "Job")


def k8s_docs(*names: str) -> list[dict]:
    return [d for name in names or FILES for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def pod_templates() -> dict[str, dict]:
    """component label -> pod template of every StatefulSet, Deployment and Job."""
    return {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]
            for d in k8s_docs() if d["kind"] in WORKLOADS}


def role_of(component: str) -> str:
    """The psctl command a component runs (its CURVE role: admin for submit)."""
    return "worker" if component == "gpu-worker" else component


def psctl_args(container: dict) -> list[str]:
    """The psctl arguments a container runs (through `sh -c "exec psctl ..."` or as the image's entry point)."""
    if container.get("command", [])[-2:] == ["sh", "-c"]:
        line = container["args"][0].replace('"${HOSTNAME##*-}"', "0").replace("${HOSTNAME}", "pod-0")
        words = shlex.split(line)
        assert words[:2] == ["exec", "psctl"]
        return words[2:]
    return [re.sub(r"\$\((\w+)\)", r"\1", a) for a in container["args"]]  # $(VAR): Kubernetes expands it


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def curve_dir_of(args: list[str], env: dict) -> str | None:
    return args[args.index("--curve-dir") + 1] if "--curve-dir" in args else env.get("PSCLUSTER_CURVE_DIR")


def volume_secrets(volume: dict) -> list[str]:
    if "secret" in volume:
        return [volume["secret"]["secretName"]]
    return [src["secret"]["name"] for src in volume.get("projected", {}).get("sources", []) if "secret" in src]


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def kustomize() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it builds kustomizations offline)")
    done = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def kubernetes_validate(*paths: Path) -> None:
    tool = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubernetes-validate")
    if tool is None:
        pytest.skip("kubernetes-validate is not installed (setup.cfg's test extra)")
    done = subprocess.run([tool, "--strict", "-k", KUBERNETES_VERSION, *map(str, paths)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed" in done.stdout and "ERROR" not in done.stdout


# --- schema and structure -------------------------------------------------------------

@pytest.mark.parametrize("name", FILES)
def test_each_manifest_is_valid_kubernetes(name):
    kubernetes_validate(K8S / name)


def test_kustomize_output_is_valid_and_pins_every_image(tmp_path):
    rendered = kustomize()
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(rendered))
    kubernetes_validate(out)
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "setup.cfg")
    version = config["metadata"]["version"]
    images = {i["name"]: i for i in kustomization()["images"]}
    assert {i["newTag"] for i in images.values()} == {version}
    containers = [c for d in rendered + k8s_docs("submit.yaml") if d["kind"] in WORKLOADS
                  for c in d["spec"]["template"]["spec"]["containers"]]
    assert {c["image"] for c in containers} == {f"{images['pscluster']['newName']}:{version}",
                                                f"{images['pscluster-gpu']['newName']}:{version}"}
    for doc in rendered + k8s_docs():
        labels = [doc["metadata"]["labels"]]
        if doc["kind"] in WORKLOADS:
            labels.append(doc["spec"]["template"]["metadata"]["labels"])
        for found in labels:
            assert set(LABELS) <= set(found), (doc["kind"], doc["metadata"]["name"])
            assert found["app.kubernetes.io/version"] == version and found["app.kubernetes.io/part-of"] == "pscluster"
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == {
        (d["kind"], d["metadata"]["name"]) for d in k8s_docs("pscluster.yaml")}


def test_workloads_select_their_pods_without_the_version():
    for doc in k8s_docs():
        if doc["kind"] in ("StatefulSet", "Deployment"):
            spec = doc["spec"]
            selector = spec["selector"]["matchLabels"]
            assert set(selector) == set(NAME_LABELS)
            assert selector.items() <= spec["template"]["metadata"]["labels"].items()
            check_command(psctl_args(spec["template"]["spec"]["containers"][0]))


def test_statefulsets_are_governed_by_headless_services():
    docs = k8s_docs("pscluster.yaml")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for sts in (d for d in docs if d["kind"] == "StatefulSet"):
        governing = services[sts["spec"]["serviceName"]]["spec"]
        assert governing["clusterIP"] == "None" and governing["publishNotReadyAddresses"] is True
        assert governing["selector"] == sts["spec"]["selector"]["matchLabels"]
    # What the daemons dial: the scheduler's Service (a stable address) and each shard's own name.
    worker = pod_templates()["worker"]["spec"]["containers"][0]
    host, port = re.fullmatch(r"tcp://([\w-]+):(\d+)", env_of(worker)["PSCLUSTER_SCHEDULER"]).groups()
    dialed = services[host]["spec"]
    assert dialed["selector"]["app.kubernetes.io/component"] == "scheduler"
    assert int(port) in {p["port"] for p in dialed["ports"]}
    server = pod_templates()["server"]["spec"]["containers"][0]
    assert "${HOSTNAME}.pscluster-server:6000" in server["args"][0] and "pscluster-server" in services


def test_every_daemon_has_startup_readiness_and_liveness_probes_on_healthz():
    for component, pod in pod_templates().items():
        (container,) = pod["spec"]["containers"]
        if component == "submit":
            continue
        args = psctl_args(container)
        assert args[args.index("--metrics-port") + 1] == "9100", component
        assert args[args.index("--metrics-host") + 1] == "0.0.0.0", component
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] == "/healthz" and ports.get(get["port"], get["port"]) == 9100, (component, probe)
        # A scheduler restart (a minute at most) must not get the daemons killed.
        live = container["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 60
        start = container["startupProbe"]
        assert start["periodSeconds"] * start["failureThreshold"] >= 120


def test_every_pod_runs_unprivileged_with_a_read_only_root():
    accounts = {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "ServiceAccount"}
    for component, pod in pod_templates().items():
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert accounts[spec["serviceAccountName"]]["automountServiceAccountToken"] is False
        pod_ctx = spec["securityContext"]
        assert pod_ctx["runAsNonRoot"] is True and str(pod_ctx["runAsUser"]) == USER_ID
        assert str(pod_ctx["fsGroup"]) == USER_ID  # the key files (0400) and the volumes, readable by the user
        assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True
            assert ctx["capabilities"] == {"drop": ["ALL"]} and ctx["runAsNonRoot"] is True
            assert ctx.get("seccompProfile", pod_ctx["seccompProfile"]) == {"type": "RuntimeDefault"}
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], component
            args = psctl_args(container)
            for option in ("--state-dir", "--checkpoint-dir"):  # what a daemon writes is a volume
                if option in args:
                    assert args[args.index(option) + 1] in mounts, (component, option)


def test_every_container_has_requests_and_limits():
    for component, pod in pod_templates().items():
        for container in pod["spec"]["containers"]:
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                request, limit = resources["requests"][kind], resources["limits"][kind]
                assert to_number(request) <= to_number(limit), (component, kind)
    server = pod_templates()["server"]["spec"]["containers"][0]
    args = psctl_args(server)
    # Its default is half the node's memory, not the container's.
    table = parse_size(args[args.index("--max-table-bytes") + 1])
    assert table <= to_number(server["resources"]["limits"]["memory"]) / 2


def to_number(quantity) -> float:
    """A Kubernetes quantity (250m, 2, 1Gi, 512Mi) as a number."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "": 1}
    number, unit = re.fullmatch(r"([\d.]+)([a-zA-Z]*)", str(quantity)).groups()
    return float(number) * units[unit]


def test_the_gpu_worker_asks_for_one_gpu_and_runs_the_gpu_image():
    docs = {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == "Deployment"}
    gpu = docs["pscluster-worker-gpu"]
    assert gpu["spec"]["replicas"] == 0
    (container,) = gpu["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("pscluster-gpu:")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = psctl_args(container)
    assert args[0] == "worker" and args[args.index("--device") + 1] == "gpu"
    cpu = docs["pscluster-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]


def test_pod_disruption_budgets_keep_the_scheduler_and_the_shards():
    pods = pod_templates()
    budgets = [d for d in k8s_docs() if d["kind"] == "PodDisruptionBudget"]
    covered = set()
    for pdb in budgets:
        assert pdb["apiVersion"] == "policy/v1"
        selector = pdb["spec"]["selector"]["matchLabels"]
        chosen = {c for c, pod in pods.items() if selector.items() <= pod["metadata"]["labels"].items()}
        assert len(chosen) == 1
        covered |= chosen
    assert covered == {"scheduler", "server"}


# --- the submit Job ---------------------------------------------------------------------

def test_submit_job_submits_the_file_of_its_config_map_and_waits():
    (job,) = [d for d in k8s_docs("submit.yaml") if d["kind"] == "Job"]
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    args = psctl_args(container)
    assert args[0] == "submit" and "--wait" in args
    check_command(args)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    job_file = Path(args[1])
    mount = mounts[str(job_file.parent)]
    config_map = volumes[mount["name"]]["configMap"]
    assert config_map["name"] == "pscluster-job" and mount["readOnly"] is True
    assert {i["path"] for i in config_map["items"]} == {job_file.name}
    # A retried pod reuses the Job's submission id (its uid); a new Job gets a new one.
    (uid,) = [e for e in container["env"] if e["name"] == args[args.index("--submission-id") + 1]]
    assert "controller-uid" in uid["valueFrom"]["fieldRef"]["fieldPath"]


def stand_in_kubectl(tmp_path: Path, script: str) -> tuple[dict, Path]:
    """A `kubectl` first on PATH that runs `script` (sh) instead of reaching a cluster: the environment
    to run a deploy/k8s script in, and the log file the script may write ($KUBECTL_LOG; $KUBECTL_DIR
    is tmp_path)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "kubectl.log"
    bin_dir.mkdir()
    fake = bin_dir / "kubectl"
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", KUBECTL_LOG=str(log),
               KUBECTL_DIR=str(tmp_path))
    return env, log


def test_submit_script_makes_a_config_map_and_a_job_of_its_own(tmp_path):
    """deploy/k8s/submit.sh through a stand-in kubectl: the Job it creates reads the ConfigMap it made,
    both named afresh, and the ConfigMap is then owned by the Job."""
    env, log = stand_in_kubectl(tmp_path, 'echo "$*" >> "$KUBECTL_LOG"\n'
                                'case " $* " in *" -f - "*) cat > "$KUBECTL_DIR/job.yaml"; printf 0a1b-uid;; esac\n')
    example = ROOT / "deploy" / "examples" / "digits-mlp.yaml"
    done = subprocess.run(["bash", str(K8S / "submit.sh"), str(example), "-n", "ml"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    name = done.stdout.strip()
    assert re.fullmatch(r"pscluster-submit-\d{8}-\d{6}-[0-9a-f]{4}", name)
    create_cm, create_job, patch = log.read_text().splitlines()
    assert create_cm == f"create configmap {name} --from-file=job.yaml={example} -n ml"
    assert create_job.startswith("create -n ml -f -")
    assert patch.startswith(f"patch configmap {name} -n ml --type merge") and '"uid":"0a1b-uid"' in patch
    (job,) = yaml.safe_load_all((tmp_path / "job.yaml").read_text())
    assert job["metadata"]["name"] == name
    (volume,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == name
    kubernetes_validate(tmp_path / "job.yaml")


# --- CURVE keys ---------------------------------------------------------------------------

def test_pods_mount_only_their_own_secret_key():
    pods = pod_templates()
    assert set(pods) == {*DAEMONS, "gpu-worker", "submit"}
    for component, pod in pods.items():
        (container,) = pod["spec"]["containers"]
        args = psctl_args(container)
        assert args[0] == role_of(component)
        assert curve_dir_of(args, env_of(container)) == "/etc/pscluster/keys", component
        check_command(args)
        secrets = {s for v in pod["spec"]["volumes"] for s in volume_secrets(v)}
        own = "admin" if component == "submit" else role_of(component)
        assert {s for s in secrets if s.startswith("pscluster-keys-")} == {f"pscluster-keys-{own}"}, component
        assert {s for s in secrets if s.startswith("pscluster-public-")} == {f"pscluster-public-{r}" for r in ROLES}
        if "--bind" in args:
            check_protected(args[args.index("--bind") + 1], "--bind", curve=True, insecure=False)


def test_secrets_from_a_key_dir_give_each_pod_its_curve_dir(tmp_path):
    """create-secrets.sh through a stand-in kubectl, then each pod's mounts laid out from those Secrets."""
    keydir = tmp_path / "keys"
    generate_keys(keydir)
    env, log = stand_in_kubectl(tmp_path, 'if [ "$1" = create ]; then echo "$@"; else cat >> "$KUBECTL_LOG"; '
                                'echo "APPLY $*" >> "$KUBECTL_LOG"; fi\n')
    done = subprocess.run(["bash", str(K8S / "create-secrets.sh"), str(keydir), "-n", "ml"],
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
    for component, pod in pod_templates().items():
        (container,) = pod["spec"]["containers"]
        base = env_of(container)["PSCLUSTER_CURVE_DIR"]
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        view = tmp_path / "pods" / component
        for mount in container["volumeMounts"]:
            if not mount["mountPath"].startswith(base + "/"):
                continue
            assert mount.get("readOnly") is True
            target = view / Path(mount["mountPath"]).relative_to(base)
            target.mkdir(parents=True)
            for secret in volume_secrets(volumes[mount["name"]]):
                for path in secrets[secret]:  # a Secret's files appear under their base names
                    shutil.copy(path, target / path.name)
        check_key_view(view, "admin" if component == "submit" else role_of(component))


def test_network_policy_admits_only_the_cluster_to_the_daemons_and_monitoring_to_metrics():
    (policy,) = [d for d in k8s_docs() if d["kind"] == "NetworkPolicy"]
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    selector = spec["podSelector"]["matchLabels"]
    pods = pod_templates()
    for component, pod in pods.items():
        assert selector.items() <= pod["metadata"]["labels"].items(), f"the policy does not select {component}"
    daemon_ports = {p["containerPort"] for c in ("scheduler", "server")
                    for p in pods[c]["spec"]["containers"][0]["ports"] if p["name"] == "zmq"}
    assert daemon_ports == {5555, 6000}
    every_port = {p["containerPort"] for pod in pods.values() for p in pod["spec"]["containers"][0].get("ports", [])}
    covered, monitoring = set(), set()
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
            if peer.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "monitoring"}:
                monitoring |= ports
    assert covered == every_port  # nothing a daemon listens on is left blocked by mistake
    assert monitoring == {9100}
