"""The cluster packaging: KubeRay manifests, the image they run, the README's cluster commands.

Docker and Kubernetes do not run on this machine kind, so the contracts are checked statically:
each manifest validates against KubeRay's own CRD schema (../shared/k8s/kuberay-crds), every
container runs the image the README builds, as a non-root user, with Ray token auth and the
ledger URL from a Secret, and the RayJob runs exactly the README's cluster command on a config
that the project's loader accepts and the cluster has room for. Each policy check is a function
that lists problems, and a negative control shows it reports a broken manifest.
"""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "docker" / "k8s"
CRDS = REPO.parent / "shared" / "k8s" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
MANIFEST_FILES = {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml"}
RAY_SECRET, RAY_SECRET_KEY = "prefloop-ray-auth", "auth_token"  # the key KubeRay reads


# ----------------------------------------------------------------------------- loading


def _load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def _int_or_string(node):
    """CRDs mark Kubernetes quantities `x-kubernetes-int-or-string`; JSON Schema needs the
    alternatives spelled out where the CRD does not already give them as `anyOf`."""
    if isinstance(node, list):
        return [_int_or_string(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _int_or_string(value) for key, value in node.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft7Validator]:
    """kind → validator of KubeRay's `ray.io/v1` openAPIV3Schema for it."""
    if not CRDS.is_dir():
        pytest.fail(f"{CRDS} is missing: these tests need the project's shared KubeRay CRDs")
    out = {}
    for kind, filename in CRD_FILES.items():
        crd = yaml.load((CRDS / filename).read_text(), Loader=yaml.CSafeLoader)
        assert crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _int_or_string(version["schema"]["openAPIV3Schema"])
        out[kind] = jsonschema.Draft7Validator(schema)
    return out


def crd_errors(validators: dict, manifest: dict) -> list[str]:
    """Schema violations of `manifest`, one `path: message` string each."""
    validator = validators[manifest["kind"]]
    return [f"{'.'.join(map(str, err.absolute_path))}: {err.message}"
            for err in validator.iter_errors(manifest)]


def cluster_specs(manifest: dict) -> list[dict]:
    spec = manifest["spec"]
    return [spec] if manifest["kind"] == "RayCluster" else [spec["rayClusterSpec"]]


def ray_pods(manifest: dict) -> list[dict]:
    """Pod specs that run Ray: the head and every worker group."""
    pods = []
    for spec in cluster_specs(manifest):
        pods.append(spec["headGroupSpec"]["template"]["spec"])
        pods += [group["template"]["spec"] for group in spec.get("workerGroupSpecs", [])]
    return pods


def all_pods(manifest: dict) -> list[dict]:
    """Every pod spec of the manifest, the RayJob's submitter included."""
    submitter = manifest["spec"].get("submitterPodTemplate")
    return ray_pods(manifest) + ([submitter["spec"]] if submitter else [])


def containers(pods: list[dict]) -> list[dict]:
    return [c for pod in pods for c in pod.get("initContainers", []) + pod["containers"]]


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    return {kind: _load(name) for kind, name in MANIFEST_FILES.items()}


def readme_cluster_section() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## Running on a cluster\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, "README.md has no '## Running on a cluster' section"
    return match.group(1)


def readme_image() -> str:
    match = re.search(r"^docker build -f docker/Dockerfile -t (\S+) \.$",
                      readme_cluster_section(), re.M)
    assert match, "the README's cluster section has no `docker build -f docker/Dockerfile -t ...`"
    return match.group(1)


def readme_job_command() -> str:
    match = re.search(r"^ray job submit --working-dir \. -- (.+)$", readme_cluster_section(),
                      re.M)
    assert match, "the README's cluster section has no `ray job submit --working-dir . -- ...`"
    return match.group(1)


# ----------------------------------------------------------------------------- policy checks


def ledger_url_problems(manifest: dict) -> list[str]:
    """Every Ray container reads PREFLOOP_DB_URL from a Secret, never from a literal."""
    problems = []
    for c in containers(ray_pods(manifest)):
        item = env_of(c).get("PREFLOOP_DB_URL")
        if item is None:
            problems.append(f"{c['name']}: no PREFLOOP_DB_URL")
        elif "value" in item or "secretKeyRef" not in item.get("valueFrom", {}):
            problems.append(f"{c['name']}: PREFLOOP_DB_URL is not a secretKeyRef")
    return problems


def token_auth_problems(manifest: dict) -> list[str]:
    """KubeRay's authOptions and every container: RAY_AUTH_MODE=token, token from the Secret."""
    problems = []
    for spec in cluster_specs(manifest):
        if spec.get("authOptions") != {"mode": "token", "secretName": RAY_SECRET}:
            problems.append(f"authOptions is {spec.get('authOptions')!r}")
    for c in containers(all_pods(manifest)):
        env = env_of(c)
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            problems.append(f"{c['name']}: RAY_AUTH_MODE is not 'token'")
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        if ref != {"name": RAY_SECRET, "key": RAY_SECRET_KEY}:
            problems.append(f"{c['name']}: RAY_AUTH_TOKEN is not the {RAY_SECRET} Secret")
    return problems


def root_problems(manifest: dict, uid: int) -> list[str]:
    """Pods and containers run as `uid` (not root), without privilege escalation."""
    problems = []
    for pod in all_pods(manifest):
        ctx = pod.get("securityContext", {})
        if ctx.get("runAsNonRoot") is not True or ctx.get("runAsUser") != uid:
            problems.append(f"pod {ctx!r}: expected runAsNonRoot and runAsUser {uid}")
    for c in containers(all_pods(manifest)):
        ctx = c.get("securityContext", {})
        if (ctx.get("runAsNonRoot") is not True or ctx.get("runAsUser") != uid
                or ctx.get("allowPrivilegeEscalation") is not False
                or ctx.get("privileged") or ctx.get("capabilities", {}).get("drop") != ["ALL"]):
            problems.append(f"{c['name']}: securityContext {ctx!r}")
    return problems


def exposure_problems(manifest: dict) -> list[str]:
    """The head (dashboard, Jobs API) is reachable inside the cluster network only."""
    problems = []
    for spec in cluster_specs(manifest):
        head = spec["headGroupSpec"]
        service_type = head.get("serviceType", "ClusterIP")
        if service_type != "ClusterIP":
            problems.append(f"head serviceType {service_type}")
        if head.get("enableIngress"):
            problems.append("head enableIngress")
        if head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
            problems.append("headService is not ClusterIP")
    return problems


# ----------------------------------------------------------------------------- schema


@pytest.mark.parametrize("kind", sorted(MANIFEST_FILES))
def test_manifest_validates_against_the_kuberay_crd(validators, manifests, kind):
    manifest = manifests[kind]
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == kind
    assert crd_errors(validators, manifest) == []


def _set(path: str, value) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = doc
        for part in parents:
            node = node[part]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return mutate


HEAD_LIMITS = "spec.headGroupSpec.template.spec.containers.0.resources.limits"
BROKEN = {  # name → (kind, mutation, the path the error must name)
    "entrypoint not a string": ("RayJob", _set("spec.entrypoint", ["python", "-m"]),
                                "spec.entrypoint"),
    "replicas a string": ("RayCluster", _set("spec.workerGroupSpecs.0.replicas", "1"),
                          "spec.workerGroupSpecs.0.replicas"),
    "headGroupSpec missing": ("RayCluster", _set("spec.headGroupSpec", KeyError), "spec"),
    "auth mode not in the enum": ("RayCluster", _set("spec.authOptions.mode", "password"),
                                  "spec.authOptions.mode"),
    "quantity an object": ("RayCluster", _set(HEAD_LIMITS + ".cpu", {"n": 4}),
                           HEAD_LIMITS + ".cpu"),
    "env without a name": ("RayJob", _set(
        "spec.submitterPodTemplate.spec.containers.0.env.0.name", KeyError),
        "spec.submitterPodTemplate.spec.containers.0.env.0"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_crd_validation_rejects_a_broken_manifest(validators, manifests, case):
    kind, mutate, path = BROKEN[case]
    broken = copy.deepcopy(manifests[kind])
    mutate(broken)
    errors = crd_errors(validators, broken)
    assert any(e.startswith(f"{path}: ") for e in errors), errors


def test_int_or_string_quantities_accept_integers(validators, manifests):
    """The positive twin of 'quantity an object': `cpu: 4` is as valid as `cpu: "4"`."""
    manifest = copy.deepcopy(manifests["RayCluster"])
    _set(HEAD_LIMITS + ".cpu", 4)(manifest)
    assert crd_errors(validators, manifest) == []


def test_the_rayjob_cluster_is_the_raycluster_manifest(manifests):
    """One cluster definition, written twice (kubectl has no include): they must not drift."""
    assert manifests["RayJob"]["spec"]["rayClusterSpec"] == manifests["RayCluster"]["spec"]


# ----------------------------------------------------------------------------- README contract


def test_every_container_runs_the_image_the_readme_builds(manifests):
    image = readme_image()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert image == f"prefloop:{version}"
    for kind, manifest in manifests.items():
        found = containers(all_pods(manifest))
        assert len(found) >= (3 if kind == "RayCluster" else 4)
        assert {c["image"] for c in found} == {image}, kind


def test_the_rayjob_runs_the_readme_cluster_command(manifests):
    command = readme_job_command()
    assert command == "python -m loop.main run configs/cluster.yaml --auto-resume"
    job = manifests["RayJob"]["spec"]
    assert job["entrypoint"] == command
    # `--working-dir .` from a checkout; the image's checkout is the Dockerfile's WORKDIR
    workdirs = re.findall(r"^WORKDIR (\S+)$", (REPO / "docker/Dockerfile").read_text(), re.M)
    assert yaml.safe_load(job["runtimeEnvYAML"]) == {"working_dir": workdirs[-1]}
    assert (REPO / command.split()[4]).is_file()


def test_the_cluster_command_parses_with_the_cli():
    """`--auto-resume` (continue the run directory's campaign, else start) is a `run` option."""
    import typer.main

    from loop.cli import app

    argv = readme_job_command().split()
    assert argv[:4] == ["python", "-m", "loop.main", "run"]
    run = typer.main.get_command(app).commands["run"]
    params = run.make_context("run", argv[4:]).params
    assert params["config"] == Path("configs/cluster.yaml")
    assert params["auto_resume"] is True and params["resume"] is None
    with pytest.raises(Exception, match="No such option"):  # the parse can fail
        run.make_context("run", [*argv[4:], "--auto-resum"])


def test_readme_states_the_security_rules():
    section = " ".join(readme_cluster_section().split())
    for claim in ("execute arbitrary code", "must never be reachable from untrusted networks",
                  "RAY_AUTH_MODE=token", "bind 127.0.0.1 by default"):
        assert claim in section, claim


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r'^ARG (\w+)="?([^"\n]*)"?$', (REPO / "docker/Dockerfile").read_text(),
                           re.M))


def test_the_image_is_cuda_with_a_matching_pinned_torch(manifests):
    """Default build: a CUDA cuDNN runtime base, torch from the wheel index of the same CUDA
    line, pinned to the torch CI tests (.ci/setup) and inside the pyproject's range; Ray and
    DeepSpeed pinned inside their ranges, Ray the version the manifests declare."""
    from packaging.requirements import Requirement

    args = dockerfile_args()
    base = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu\d+\.\d+", args["BASE"])
    assert base, args["BASE"]
    assert args["TORCH_INDEX"] == f"cu{base[1]}{base[2]}"
    assert f'torch=={args["TORCH_VERSION"]}' in (REPO / ".ci/setup").read_text()
    deps = {Requirement(d).name: Requirement(d) for d in
            tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    for name, arg in (("torch", "TORCH_VERSION"), ("ray", "RAY_VERSION"),
                      ("deepspeed", "DEEPSPEED_VERSION")):
        assert deps[name].specifier.contains(args[arg]), (name, args[arg])
    for manifest in manifests.values():
        assert all(s["rayVersion"] == args["RAY_VERSION"] for s in cluster_specs(manifest))


# ----------------------------------------------------------------------------- security


@pytest.mark.parametrize("kind", sorted(MANIFEST_FILES))
def test_ledger_url_comes_from_a_secret(manifests, kind):
    assert ledger_url_problems(manifests[kind]) == []
    assert "postgresql" not in (K8S / MANIFEST_FILES[kind]).read_text()


def test_ledger_secret_example_holds_a_postgres_url(manifests):
    secrets = {d["metadata"]["name"]: d for d in
               yaml.safe_load_all((K8S / "secrets.example.yaml").read_text())}
    refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for m in manifests.values() for c in containers(all_pods(m))
            for e in c["env"] if "valueFrom" in e}
    assert refs == {("prefloop-ledger", "db_url"), (RAY_SECRET, RAY_SECRET_KEY)}
    for name, key in refs:
        assert secrets[name]["kind"] == "Secret" and key in secrets[name]["stringData"]
    assert secrets["prefloop-ledger"]["stringData"]["db_url"].startswith("postgresql+psycopg://")


@pytest.mark.parametrize("kind", sorted(MANIFEST_FILES))
def test_ray_token_auth_on_every_container(manifests, kind):
    assert token_auth_problems(manifests[kind]) == []


@pytest.mark.parametrize("kind", sorted(MANIFEST_FILES))
def test_dashboard_is_not_exposed_outside_the_cluster(manifests, kind):
    assert exposure_problems(manifests[kind]) == []


def dockerfile_user() -> str:
    users = re.findall(r"^USER (\S+)$", (REPO / "docker/Dockerfile").read_text(), re.M)
    assert users, "docker/Dockerfile sets no USER"
    return users[-1]


@pytest.mark.parametrize("kind", sorted(MANIFEST_FILES))
def test_nothing_runs_as_root(manifests, kind):
    user = dockerfile_user().split(":")[0]
    assert (REPO / "docker/Dockerfile").read_text().rstrip().splitlines()[-1].startswith("USER ")
    assert user.isdigit() and int(user) != 0  # numeric, so runAsNonRoot can verify it
    assert root_problems(manifests[kind], uid=int(user)) == []


def _first_container(doc: dict) -> dict:
    return containers(ray_pods(doc))[0]


NEGATIVE = {  # name → (mutation, the check that must report it)
    "literal ledger URL": (
        lambda d: _first_container(d)["env"].__setitem__(2, {
            "name": "PREFLOOP_DB_URL", "value": "postgresql+psycopg://u:p@db/x"}),
        ledger_url_problems),
    "auth mode dropped": (
        lambda d: _first_container(d)["env"].pop(0), token_auth_problems),
    "authOptions off": (
        lambda d: cluster_specs(d)[0].update(authOptions={"mode": "disabled"}),
        token_auth_problems),
    "root user": (
        lambda d: _first_container(d)["securityContext"].update(runAsUser=0),
        lambda d: root_problems(d, uid=10001)),
    "privilege escalation": (
        lambda d: ray_pods(d)[-1]["containers"][0]["securityContext"].update(
            allowPrivilegeEscalation=True),
        lambda d: root_problems(d, uid=10001)),
    "LoadBalancer head": (
        lambda d: cluster_specs(d)[0]["headGroupSpec"].update(serviceType="LoadBalancer"),
        exposure_problems),
}


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_policy_checks_report_a_broken_manifest(manifests, case):
    mutate, check = NEGATIVE[case]
    broken = copy.deepcopy(manifests["RayJob"])
    mutate(broken)
    assert check(broken) != []


# ----------------------------------------------------------------------------- the campaign


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_cluster_config_loads_and_fits_the_cluster(manifests):
    from loop.campaign import required_cpus
    from loop.config_load import load_config

    cfg = load_config(REPO / "configs/cluster.yaml")
    assert cfg.storage.db_url is None and cfg.storage.weights_uri is None  # from the env
    assert cfg.campaign.run_dir is None
    spec = manifests["RayCluster"]["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the driver only
    limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"]
              for g in spec["workerGroupSpecs"] for _ in range(g["replicas"])]
    gpu_pods = [int(lim.get("nvidia.com/gpu", 0)) for lim in limits]
    # the RM trainer ranks fit on one GPU node together (NCCL stays inside the node)
    assert max(gpu_pods) >= cfg.rm.trainers * cfg.resources.gpus_per_actor > 0
    assert sum(_cpus(lim["cpu"]) for lim in limits) >= required_cpus(cfg)


def test_cluster_ledger_and_run_dir_come_from_the_manifest_env(manifests, monkeypatch,
                                                               tmp_path):
    """What the manifests set is what the campaign uses: PostgreSQL from the Secret, the run
    directory on the shared volume that every Ray container mounts."""
    from loop.config_load import load_config
    from loop.run_dir import resolve_run_dir
    from storage.db import resolve_url

    url = "postgresql+psycopg://prefloop@db:5432/prefloop"
    monkeypatch.setenv("PREFLOOP_DB_URL", url)
    cfg = load_config(REPO / "configs/cluster.yaml")
    assert resolve_url(cfg.storage.db_url, tmp_path) == url
    for pod in ray_pods(manifests["RayJob"]):
        (c,) = pod["containers"]
        run_dir = env_of(c)["PREFLOOP_RUN_DIR"]["value"]
        monkeypatch.setenv("PREFLOOP_RUN_DIR", run_dir)
        assert resolve_run_dir(cfg) == Path(run_dir)
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = [m["mountPath"] for m in c["volumeMounts"] if m["name"] in claims]
        for key in ("PREFLOOP_RUN_DIR", "PREFLOOP_WEIGHTS_URI"):
            assert any(env_of(c)[key]["value"].startswith(m + "/") for m in mounts), key
