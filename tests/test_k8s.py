"""Checks of the Kubernetes manifests in k8s/ (kustomize).

Every kustomization (base and each overlay) is rendered with `kubectl kustomize` and
the rendered objects are checked: resources, pinned images, no Secrets (k8s/secrets.sh
makes them, run here against a stand-in kubectl), references between objects, probes,
the MLflow server settings and its authentication, the object store, PostgreSQL, the GPU
node profile and quota, the pipeline-runner RBAC, and what training TrainJobs need in the run
namespace (tests/test_trainjob.py validates the TrainingRuntime against the Trainer CRD).
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBECTL = shutil.which("kubectl")

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")

NAMESPACE = "sfddm"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
# Targets that deploy the sfddm stack (namespace sfddm); kfp-runs only adds the
# pipeline-runner identity to KFP's namespace.
STACKS = ["base"] + [o for o in OVERLAYS if o != "kfp-runs"]
TARGETS = STACKS + (["kfp-runs"] if "kfp-runs" in OVERLAYS else [])
RUN_NAMESPACE = "kubeflow"      # overlays/kfp-runs, and k8s/secrets.sh's default
COMPILED_PIPELINE = ROOT / "pipelines" / "sfddm_pipeline.yaml"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}
MLFLOW_HOST = "mlflow.sfddm.svc.cluster.local"


def target_dir(target: str) -> Path:
    return K8S / "base" if target == "base" else K8S / "overlays" / target


def kustomize(path: Path) -> list[dict]:
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, f"{path} renders nothing"
    return docs


@functools.lru_cache(maxsize=None)
def _render(target: str) -> tuple:
    return tuple(kustomize(target_dir(target)))


def render(target: str) -> list[dict]:
    return list(_render(target))


def find(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind, name):
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict) -> dict | None:
    kind = doc["kind"]
    if kind == "Pod":
        return doc["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind in WORKLOAD_KINDS:
        return doc["spec"]["template"]["spec"]
    return None


def pod_template_labels(doc: dict) -> dict:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {})
    return doc["spec"]["template"]["metadata"].get("labels", {})


def workloads(docs):
    return [d for d in docs if pod_spec(d) is not None]


def containers(spec: dict) -> list[dict]:
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def all_containers(docs):
    for doc in workloads(docs):
        for c in containers(pod_spec(doc)):
            yield doc, c


def container(docs, kind, name, container_name) -> dict:
    spec = pod_spec(one(docs, kind, name))
    found = [c for c in spec["containers"] if c["name"] == container_name]
    assert found, f"{kind}/{name} has no container {container_name}"
    return found[0]


def env_map(c: dict) -> dict:
    return {e["name"]: e for e in c.get("env", [])}


_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m?)$")
_MEM = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_MEM_UNITS = {None: 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(resource: str, value) -> float:
    value = str(value)
    if resource == "cpu":
        m = _CPU.match(value)
        assert m, f"bad cpu quantity {value!r}"
        return float(m.group(1)) / (1000 if m.group(2) else 1)
    m = _MEM.match(value)
    assert m, f"bad quantity {value!r}"
    return float(m.group(1)) * _MEM_UNITS[m.group(2)]


# --------------------------------------------------------------------------- generic


@pytest.mark.parametrize("target", TARGETS)
def test_renders_valid_unique_objects(target):
    docs = render(target)
    seen = set()
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), d
        key = (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)


@pytest.mark.parametrize("target", TARGETS)
def test_everything_namespaced_in_one_namespace(target):
    expected = "kubeflow" if target == "kfp-runs" else NAMESPACE
    for d in render(target):
        if d["kind"] == "Namespace":
            assert d["metadata"]["name"] == NAMESPACE
            continue
        assert d["metadata"].get("namespace") == expected, (d["kind"], d["metadata"]["name"])


def test_base_has_namespace():
    ns = one(render("base"), "Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] in {"baseline", "restricted"}


@pytest.mark.parametrize("target", STACKS)
def test_every_container_has_cpu_memory_requests_and_limits(target):
    checked = 0
    for doc, c in all_containers(render(target)):
        where = f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}"
        res = c.get("resources", {})
        for section in ("requests", "limits"):
            for r in ("cpu", "memory"):
                assert r in res.get(section, {}), f"{where}: no {section}.{r}"
        for r in ("cpu", "memory"):
            assert quantity(r, res["requests"][r]) <= quantity(r, res["limits"][r]), f"{where}: {r} request > limit"
        checked += 1
    assert checked >= 5  # mlflow (+init), postgres, seaweedfs (+init), bucket job


@pytest.mark.parametrize("target", STACKS)
def test_images_pinned(target):
    for doc, c in all_containers(render(target)):
        image = c["image"]
        if "@sha256:" in image:
            continue
        last = image.rsplit("/", 1)[-1]
        assert ":" in last, f"{c['name']}: image {image} has no tag"
        tag = last.split(":", 1)[1]
        assert tag and tag != "latest", f"{c['name']}: image {image} is not pinned"


@pytest.mark.parametrize("target", STACKS)
def test_pods_run_as_non_root_without_privileges(target):
    for doc, c in all_containers(render(target)):
        spec = pod_spec(doc)
        where = f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}"
        non_root = c.get("securityContext", {}).get(
            "runAsNonRoot", spec.get("securityContext", {}).get("runAsNonRoot")
        )
        assert non_root is True, f"{where}: not runAsNonRoot"
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not sc.get("privileged", False), where


@pytest.mark.parametrize("target", TARGETS)
def test_no_secrets_in_manifests(target):
    """A Secret in the manifests (a CHANGE_ME template above all) would be reset by every
    `kubectl apply -k`; k8s/secrets.sh creates them once instead."""
    docs = render(target)
    assert not find(docs, "Secret"), [s["metadata"]["name"] for s in find(docs, "Secret")]
    assert "CHANGE_ME" not in yaml.safe_dump_all(docs)


@pytest.mark.parametrize("target", STACKS)
def test_references_resolve(target, script_secrets):
    """ConfigMaps (and their keys), service accounts and PVC templates used by pods exist
    in the rendered output; Secrets (and their keys) are those k8s/secrets.sh creates in
    the namespace."""
    docs = render(target)
    secrets = script_secrets[NAMESPACE]

    def keys(kind, name):
        if kind == "Secret":
            assert name in secrets, f"Secret {name} is not created by k8s/secrets.sh"
            return set(secrets[name])
        obj = one(docs, kind, name)
        return set(obj.get("data") or {}) | set(obj.get("stringData") or {})

    for doc in workloads(docs):
        spec = pod_spec(doc)
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if "serviceAccountName" in spec:
            one(docs, "ServiceAccount", spec["serviceAccountName"])
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        for v in volumes.values():
            if "secret" in v:
                keys("Secret", v["secret"]["secretName"])
            if "configMap" in v:
                one(docs, "ConfigMap", v["configMap"]["name"])
        for c in containers(spec):
            for ef in c.get("envFrom", []):
                if "secretRef" in ef:
                    keys("Secret", ef["secretRef"]["name"])
                if "configMapRef" in ef:
                    one(docs, "ConfigMap", ef["configMapRef"]["name"])
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    r = ref["secretKeyRef"]
                    assert r["key"] in keys("Secret", r["name"]), f"{where}: {r}"
                if "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    assert r["key"] in keys("ConfigMap", r["name"]), f"{where}: {r}"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in claims, f"{where}: mount {m['name']}"


@pytest.mark.parametrize("target", STACKS)
def test_services_select_pods_and_named_ports(target):
    docs = render(target)
    for svc in find(docs, "Service"):
        selector = svc["spec"]["selector"]
        matches = [
            w for w in workloads(docs)
            if selector.items() <= pod_template_labels(w).items() and w["kind"] in {"Deployment", "StatefulSet"}
        ]
        assert len(matches) == 1, f"Service {svc['metadata']['name']} selects {len(matches)} workloads"
        ports = {p.get("name") for c in pod_spec(matches[0])["containers"] for p in c.get("ports", [])}
        numbers = {p["containerPort"] for c in pod_spec(matches[0])["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            target_port = p.get("targetPort", p["port"])
            assert target_port in ports or target_port in numbers, (svc["metadata"]["name"], target_port)


@pytest.mark.parametrize("target", STACKS)
def test_long_running_containers_have_probes(target):
    docs = render(target)
    for doc in workloads(docs):
        if doc["kind"] not in {"Deployment", "StatefulSet"}:
            continue
        for c in pod_spec(doc)["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, f"{doc['metadata']['name']}/{c['name']}"
            port_names = {p.get("name") for p in c.get("ports", [])} | {p["containerPort"] for p in c.get("ports", [])}
            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(probe_name)
                if not probe:
                    continue
                for handler in ("httpGet", "tcpSocket"):
                    if handler in probe:
                        assert probe[handler]["port"] in port_names, (c["name"], probe_name)


@pytest.mark.parametrize("target", TARGETS)
def test_rbac_bindings_resolve(target):
    docs = render(target)
    for rb in find(docs, "RoleBinding"):
        assert rb["roleRef"]["kind"] == "Role"
        one(docs, "Role", rb["roleRef"]["name"])
        for s in rb["subjects"]:
            assert s["kind"] == "ServiceAccount"
            sa = one(docs, "ServiceAccount", s["name"])
            assert s["namespace"] == sa["metadata"]["namespace"] == rb["metadata"]["namespace"]


@pytest.mark.parametrize("target", TARGETS)
def test_pipeline_runner_identity(target):
    docs = render(target)
    one(docs, "ServiceAccount", "sfddm-pipeline-runner")
    role = one(docs, "Role", "sfddm-pipeline-runner")
    binding = one(docs, "RoleBinding", "sfddm-pipeline-runner")
    assert binding["roleRef"]["name"] == "sfddm-pipeline-runner"

    def allows(resource, verb, name=None):
        for rule in role["rules"]:
            if resource in rule["resources"] and (verb in rule["verbs"] or "*" in rule["verbs"]):
                if name is None or "resourceNames" not in rule or name in rule["resourceNames"]:
                    return True
        return False

    assert allows("pods", "get") and allows("pods", "list")
    assert allows("pods/log", "get")
    # The training steps' launcher: TrainJobs of its runs, and the runtime they reference.
    for verb in ("create", "get", "list", "watch", "delete"):
        assert allows("trainjobs", verb), verb
    assert allows("trainingruntimes", "get") and allows("trainingruntimes", "list")
    assert allows("workflowtaskresults", "create")
    assert allows("secrets", "get", "sfddm-mlflow-s3")
    assert allows("secrets", "get", "sfddm-mlflow-runner")
    assert allows("configmaps", "get", "sfddm-pipeline-settings")
    assert allows("configmaps", "get", "sfddm-gpu-profile")
    # Read rights on secrets are limited to named ones.
    for rule in role["rules"]:
        if "secrets" in rule["resources"]:
            assert rule.get("resourceNames"), "secrets readable without resourceNames"
            assert set(rule["verbs"]) <= {"get"}
    settings = one(docs, "ConfigMap", "sfddm-pipeline-settings")["data"]
    assert settings["MLFLOW_TRACKING_URI"] == f"http://{MLFLOW_HOST}:5000"
    assert settings["AWS_ENDPOINT_URL"] == "http://seaweedfs.sfddm.svc.cluster.local:8333"


def test_kfp_runs_overlay_targets_kubeflow_without_secrets():
    if "kfp-runs" not in OVERLAYS:
        pytest.skip("no kfp-runs overlay")
    docs = render("kfp-runs")
    assert not find(docs, "Secret"), "kfp-runs must not template Secrets (re-apply would overwrite them)"
    assert not workloads(docs)


def test_gpu_quota_is_where_pipeline_pods_run():
    """Pipeline pods run as the pipeline-runner service account in KFP's run namespace: a
    GPU quota anywhere else (the sfddm namespace) caps nothing they request."""
    docs = render("kfp-runs")
    runner = one(docs, "ServiceAccount", "sfddm-pipeline-runner")
    quotas = [q for q in find(docs, "ResourceQuota") if "requests.nvidia.com/gpu" in q["spec"]["hard"]]
    assert len(quotas) == 1
    quota = quotas[0]
    assert quota["metadata"]["namespace"] == runner["metadata"]["namespace"] == RUN_NAMESPACE
    # No GPU step of the pipeline asks for more than the quota allows (it would never start). The
    # training steps' counts come from the training_plan step at run time: 1 to train in their pod,
    # 0 while a TrainJob trains (tests/test_pipeline.py); the TrainJob's pods count then, and the
    # quota fits the README's example of 2 nodes x 4 GPUs.
    pipeline_spec = next(yaml.safe_load_all(COMPILED_PIPELINE.read_text()))
    counts = [e["container"]["resources"]["accelerator"]["resourceCount"]
              for e in pipeline_spec["deploymentSpec"]["executors"].values()
              if "accelerator" in e["container"].get("resources", {})]
    counts = [1 if "pipelinechannel--training-plan-" in count else int(count) for count in counts]
    gpus = quantity("cpu", quota["spec"]["hard"]["requests.nvidia.com/gpu"])
    assert counts and max(counts) <= gpus and 2 * 4 <= gpus
    # The stacks in namespace sfddm, where no pipeline pod runs, hold no GPU quota.
    for target in STACKS:
        for q in find(render(target), "ResourceQuota"):
            assert "requests.nvidia.com/gpu" not in q["spec"]["hard"], (target, q["metadata"]["name"])


# --------------------------------------------------------------------------- MLflow


def _mlflow(target):
    docs = render(target)
    return docs, container(docs, "Deployment", "mlflow", "mlflow")


def _option(c: dict, flag: str, env_name: str) -> str | None:
    args = list(c.get("command", [])) + list(c.get("args", []))
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    env = env_map(c)
    if env_name in env:
        return env[env_name].get("value")
    return None


@pytest.mark.parametrize("target", STACKS)
def test_mlflow_server_settings(target):
    docs, c = _mlflow(target)
    args = list(c.get("command", [])) + list(c.get("args", []))
    assert "server" in args
    assert "--serve-artifacts" in args
    assert _option(c, "--host", "MLFLOW_HOST") == "0.0.0.0"

    destination = _option(c, "--artifacts-destination", "MLFLOW_ARTIFACTS_DESTINATION")
    assert destination and destination.startswith("s3://"), destination

    hosts = _option(c, "--allowed-hosts", "MLFLOW_SERVER_ALLOWED_HOSTS")
    assert hosts, "no --allowed-hosts / MLFLOW_SERVER_ALLOWED_HOSTS"
    patterns = [h.strip() for h in hosts.split(",")]
    assert "*" not in patterns
    assert any(MLFLOW_HOST in p for p in patterns)
    # The same matching as MLflow's host-header check: the URL that pipeline tasks use
    # (Host header "mlflow.sfddm.svc.cluster.local:5000") must pass.
    settings = one(docs, "ConfigMap", "sfddm-pipeline-settings")["data"]
    host_header = settings["MLFLOW_TRACKING_URI"].split("://", 1)[1].rstrip("/")
    for header in (host_header, "mlflow:5000", "localhost:5000"):
        assert any(fnmatch.fnmatch(header, p) if "*" in p else header == p for p in patterns), header
    assert not any(fnmatch.fnmatch("evil.example.com", p) if "*" in p else p == "evil.example.com" for p in patterns)

    # Backend store: PostgreSQL URI assembled from env vars that come from the Secret
    # and ConfigMap, never a literal password.
    uri = _option(c, "--backend-store-uri", "MLFLOW_BACKEND_STORE_URI")
    assert uri and re.match(r"^postgresql(\+\w+)?://", uri), uri
    assert "@postgres.sfddm.svc.cluster.local:5432/" in uri
    env = env_map(c)
    refs = re.findall(r"\$\((\w+)\)", uri)
    assert len(refs) == 3, uri
    user_ref, password_ref = re.match(r"^[^:]+://\$\((\w+)\):\$\((\w+)\)@", uri).groups()
    assert env[password_ref]["valueFrom"]["secretKeyRef"]["name"] == "sfddm-postgres"
    for ref in refs:
        assert "valueFrom" in env[ref], f"{ref} is not taken from a Secret/ConfigMap"
    # Kubernetes expands $(VAR) only for variables defined earlier in the list.
    names = [e["name"] for e in c["env"]]
    backend_env = "MLFLOW_BACKEND_STORE_URI" if "MLFLOW_BACKEND_STORE_URI" in env else None
    if backend_env:
        assert all(names.index(r) < names.index(backend_env) for r in refs)

    # Artifacts: S3 endpoint is the object store service; credentials from the Secret.
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://seaweedfs.sfddm.svc.cluster.local:8333"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "sfddm-mlflow-s3", "key": key}


@pytest.mark.parametrize("target", STACKS)
def test_mlflow_requires_authentication(target):
    """The basic-auth app, its config file written from the ConfigMap plus the database URI
    by an init container into a volume the server reads, the admin and the CSRF key from
    Secret sfddm-mlflow-admin. (tests/test_mlflow_auth.py runs this setup for real.)"""
    docs, c = _mlflow(target)
    assert _option(c, "--app-name", "MLFLOW_APP_NAME") == "basic-auth"
    env = env_map(c)
    config_path = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    spec = pod_spec(one(docs, "Deployment", "mlflow"))
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    config_dir = str(Path(config_path).parent)
    assert config_dir in mounts
    [writer] = [i for i in spec["initContainers"]
                if any(m["name"] == mounts[config_dir] and not m.get("readOnly") for m in i.get("volumeMounts", []))]
    writer_mounts = {m["name"]: m["mountPath"] for m in writer["volumeMounts"]}
    script = " ".join(writer["command"] + writer["args"])
    assert f"{writer_mounts[mounts[config_dir]]}/{Path(config_path).name}" in script
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts[config_dir]]["emptyDir"].get("medium") == "Memory"    # it holds the DB password
    # The auth database: the same PostgreSQL database, its password from the Secret.
    writer_env = env_map(writer)
    uri = writer_env["AUTH_DATABASE_URI"]["value"]
    assert uri == _option(c, "--backend-store-uri", "MLFLOW_BACKEND_STORE_URI")
    assert writer_env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "sfddm-postgres", "key": "POSTGRES_PASSWORD"}
    template_mount = next(writer_mounts[v] for v in writer_mounts if "configMap" in volumes[v])
    template_map = next(volumes[v]["configMap"]["name"] for v in writer_mounts if "configMap" in volumes[v])
    assert f"{template_mount}/basic_auth.ini" in script
    ini = one(docs, "ConfigMap", template_map)["data"]["basic_auth.ini"]
    assert ini.startswith("[mlflow]") and "database_uri" not in ini and "admin_password" not in ini
    assert re.search(r"^default_permission = READ$", ini, re.M)
    for name, key in (("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_TRACKING_USERNAME"),
                      ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD"),
                      ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_FLASK_SERVER_SECRET_KEY")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "sfddm-mlflow-admin", "key": key}
    # The runner's user comes from a Job running with the admin's credentials.
    job = one(docs, "Job", "sfddm-mlflow-users")
    job_env = env_map(pod_spec(job)["containers"][0])
    assert job_env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"]["name"] == "sfddm-mlflow-admin"
    assert job_env["RUNNER_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "sfddm-mlflow-runner", "key": "MLFLOW_TRACKING_PASSWORD"}
    assert pod_spec(job)["containers"][0]["image"] == c["image"]


def test_mlflow_image_has_the_auth_dependency():
    dockerfile = (K8S / "mlflow" / "Dockerfile").read_text()
    assert re.search(r"Flask-WTF==1\.\d", dockerfile), "the basic-auth app imports flask_wtf (mlflow[auth])"


@pytest.mark.parametrize("target", STACKS)
def test_mlflow_probes_and_service(target):
    docs, c = _mlflow(target)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == 5000
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
        assert c[probe]["httpGet"]["port"] in ("http", 5000)
    svc = one(docs, "Service", "mlflow")
    assert [p["port"] for p in svc["spec"]["ports"]] == [5000]
    # MLflow waits for the database before starting.
    init = pod_spec(one(docs, "Deployment", "mlflow")).get("initContainers", [])
    assert any("pg_isready" in " ".join(i.get("command", []) + i.get("args", [])) for i in init)


def test_mlflow_image_is_built_from_dockerfile():
    dockerfile = (K8S / "mlflow" / "Dockerfile").read_text()
    m = re.search(r"^FROM\s+ghcr\.io/mlflow/mlflow:v(\d+\.\d+\.\d+)\s*$", dockerfile, re.M)
    assert m, "Dockerfile must build FROM a pinned ghcr.io/mlflow/mlflow:vX.Y.Z"
    version = m.group(1)
    # Drivers the server needs are installed at build time, pinned.
    assert re.search(r"psycopg(2-binary|\[binary\])?==\d", dockerfile)
    assert re.search(r"boto3==\d", dockerfile)
    assert re.search(r"^USER\s+10001", dockerfile, re.M)

    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    images = {i["name"]: i for i in kustomization["images"]}
    assert version in images["sfddm-mlflow"]["newTag"]
    for target in STACKS:
        docs, c = _mlflow(target)
        assert c["image"].rsplit("/", 1)[-1] == f"sfddm-mlflow:{images['sfddm-mlflow']['newTag']}"
        spec = pod_spec(one(docs, "Deployment", "mlflow"))
        assert spec["securityContext"]["runAsUser"] == 10001
        if "psycopg[binary]" in dockerfile:
            assert _option(c, "--backend-store-uri", "MLFLOW_BACKEND_STORE_URI").startswith("postgresql+psycopg://")


# --------------------------------------------------------------------------- storage


@pytest.mark.parametrize("target", STACKS)
def test_postgres_statefulset_with_volume(target):
    docs = render(target)
    sts = one(docs, "StatefulSet", "postgres")
    templates = sts["spec"]["volumeClaimTemplates"]
    assert templates and templates[0]["spec"]["resources"]["requests"]["storage"]
    c = container(docs, "StatefulSet", "postgres", "postgres")
    assert c["image"].startswith("postgres:")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    data_path = mounts[templates[0]["metadata"]["name"]]
    pgdata = env_map(c)["PGDATA"]["value"]
    assert pgdata.startswith(data_path.rstrip("/") + "/")
    assert env_map(c)["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "sfddm-postgres"
    svc = one(docs, "Service", "postgres")
    assert [p["port"] for p in svc["spec"]["ports"]] == [5432]


@pytest.mark.parametrize("target", STACKS)
def test_object_store_is_seaweedfs_with_s3(target):
    docs = render(target)
    stores = [
        w for w in workloads(docs)
        for c in pod_spec(w)["containers"] if c["image"].startswith("chrislusf/seaweedfs:")
    ]
    assert len(stores) == 1
    store = stores[0]
    c = next(c for c in pod_spec(store)["containers"] if c["image"].startswith("chrislusf/seaweedfs:"))
    args = list(c.get("command", [])) + list(c.get("args", []))
    assert "server" in args and "-s3" in args
    assert 8333 in {p["containerPort"] for p in c["ports"]}
    # Persistent data and an S3 identity file (no anonymous access).
    assert store["kind"] == "StatefulSet" and store["spec"]["volumeClaimTemplates"]
    assert any(a.startswith("-s3.config=") for a in args)
    svc = one(docs, "Service", "seaweedfs")
    assert 8333 in [p["port"] for p in svc["spec"]["ports"]]


@pytest.mark.parametrize("target", STACKS)
def test_bucket_job_creates_the_buckets(target):
    docs = render(target)
    job = one(docs, "Job", "sfddm-create-buckets")
    c = pod_spec(job)["containers"][0]
    assert c["image"].startswith("amazon/aws-cli:")
    buckets = env_map(c)["BUCKETS"]["value"].split()
    assert set(buckets) >= {"mlflow-artifacts", "sfddm-dvc"}
    _, mlflow = _mlflow(target)
    destination = _option(mlflow, "--artifacts-destination", "MLFLOW_ARTIFACTS_DESTINATION")
    assert destination.split("/")[2] in buckets
    dvc_url = one(docs, "ConfigMap", "sfddm-pipeline-settings")["data"]["DVC_REMOTE_URL"]
    assert dvc_url.split("/")[2] in buckets
    assert env_map(c)["AWS_ENDPOINT_URL"]["value"] == "http://seaweedfs.sfddm.svc.cluster.local:8333"


# --------------------------------------------------------------------------- GPU


GPU_KEYS = ("gpu_node_selector_key", "gpu_node_selector_value", "gpu_toleration_key")


def test_gpu_overlay_applies_node_profile():
    assert "gpu" in OVERLAYS
    docs = render("gpu")
    profile = one(docs, "ConfigMap", "sfddm-gpu-profile")["data"]
    for key in GPU_KEYS:
        assert profile.get(key), f"sfddm-gpu-profile lacks {key}"
    assert profile["gpu_toleration_key"] == "nvidia.com/gpu"

    # Pods that request GPUs are scheduled with exactly this profile.
    gpu_pods = [
        w for w in workloads(docs)
        if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in containers(pod_spec(w)))
    ]
    assert gpu_pods, "the gpu overlay schedules nothing with the GPU profile"
    for w in gpu_pods:
        spec = pod_spec(w)
        assert spec["nodeSelector"] == {profile["gpu_node_selector_key"]: profile["gpu_node_selector_value"]}
        tolerations = spec["tolerations"]
        assert any(
            t["key"] == profile["gpu_toleration_key"]
            and t.get("operator", "Equal") == profile.get("gpu_toleration_operator", t.get("operator", "Equal"))
            and t.get("effect") == profile.get("gpu_toleration_effect", t.get("effect"))
            for t in tolerations
        ), tolerations
    # Suspended: applying the overlay starts nothing on the GPU pool.
    for w in gpu_pods:
        if w["kind"] == "CronJob":
            assert w["spec"]["suspend"] is True

    # A LimitRange max on GPUs would reject every pod without a GPU limit.
    for lr in find(docs, "LimitRange"):
        for limit in lr["spec"]["limits"]:
            assert "nvidia.com/gpu" not in limit.get("max", {})
            assert "nvidia.com/gpu" not in limit.get("default", {})


@pytest.mark.parametrize("target", [t for t in STACKS if t != "gpu"])
def test_non_gpu_targets_request_no_gpus(target):
    docs = render(target)
    assert not find(docs, "ConfigMap", "sfddm-gpu-profile")
    for doc, c in all_containers(docs):
        for section in ("requests", "limits"):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get(section, {})


def test_local_overlay_is_smaller_than_base():
    base = {(d["kind"], d["metadata"]["name"], c["name"]): c for d, c in all_containers(render("base"))}
    for d, c in all_containers(render("local")):
        b = base[(d["kind"], d["metadata"]["name"], c["name"])]
        for section in ("requests", "limits"):
            for r in ("cpu", "memory"):
                assert quantity(r, c["resources"][section][r]) <= quantity(r, b["resources"][section][r])


# --------------------------------------------------------------------------- secrets flow

# A stand-in for kubectl with a cluster of two namespaces, its state in a JSON file:
# `get namespace`, `get secret NAME [-o jsonpath={.data.KEY}]`, and `create secret generic`,
# which the real kubectl renders (--dry-run=client, which needs no cluster), so that
# k8s/secrets.sh's arguments are the ones kubectl accepts.
FAKE_KUBECTL = """
import base64, json, os, subprocess, sys
path = os.environ["FAKE_KUBE_STATE"]
state = json.load(open(path))
args = sys.argv[1:]
ns = "default"
if args[:1] == ["-n"]:
    ns, args = args[1], args[2:]
if args[:2] == ["get", "namespace"] and len(args) == 3:
    sys.exit(0 if args[2] in state["namespaces"] else 1)
if args[:2] == ["get", "secret"]:
    secret = state["secrets"].get(ns, {}).get(args[2])
    if secret is None:
        sys.exit(f'Error from server (NotFound): secrets "{args[2]}" not found')
    if len(args) == 3:
        sys.exit(print(args[2]))
    if args[3:] == ["-o", "jsonpath={.data}"]:
        sys.exit(print(json.dumps(secret["data"], separators=(",", ":")), end=""))
    if len(args) == 5 and args[3] == "-o" and args[4].startswith("jsonpath={.data.") and args[4].endswith("}"):
        sys.exit(print(secret["data"][args[4][len("jsonpath={.data."):-1]], end=""))
if args[:3] == ["create", "secret", "generic"]:
    if ns not in state["namespaces"]:
        sys.exit(f'Error from server (NotFound): namespaces "{ns}" not found')
    if args[3] in state["secrets"].get(ns, {}):
        sys.exit(f'Error from server (AlreadyExists): secrets "{args[3]}" already exists')
    obj = json.loads(subprocess.run([os.environ["REAL_KUBECTL"], "-n", ns, *args, "--dry-run=client", "-o", "json"],
                                    check=True, capture_output=True, text=True).stdout)
    state["secrets"].setdefault(ns, {})[args[3]] = obj
    json.dump(state, open(path, "w"))
    sys.exit(print(f"secret/{args[3]} created"))
sys.exit(f"fake kubectl: unsupported {sys.argv[1:]}")
"""


class FakeCluster:
    def __init__(self, root: Path, namespaces=(NAMESPACE, RUN_NAMESPACE)):
        self.state = root / "cluster.json"
        self.state.write_text(json.dumps({"namespaces": list(namespaces), "secrets": {}}))
        self.kubectl = root / "kubectl"
        self.kubectl.write_text(f"#!{sys.executable}\n{FAKE_KUBECTL}")
        self.kubectl.chmod(0o755)

    def secrets_script(self, *args) -> subprocess.CompletedProcess:
        env = {**os.environ, "KUBECTL": str(self.kubectl), "FAKE_KUBE_STATE": str(self.state),
               "REAL_KUBECTL": KUBECTL}
        return subprocess.run(["sh", str(K8S / "secrets.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=120)

    def secrets(self) -> dict:
        """{namespace: {name: {key: value}}}"""
        return {ns: {name: {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}
                     for name, obj in secrets.items()}
                for ns, secrets in json.loads(self.state.read_text())["secrets"].items()}


@pytest.fixture(scope="module")
def script_secrets(tmp_path_factory) -> dict:
    """What k8s/secrets.sh creates in an empty cluster: {namespace: {name: {key: value}}}."""
    cluster = FakeCluster(tmp_path_factory.mktemp("cluster"))
    result = cluster.secrets_script()
    assert result.returncode == 0, result.stdout + result.stderr
    return cluster.secrets()


def test_secrets_script_makes_random_values_and_never_overwrites(tmp_path, script_secrets):
    cluster = FakeCluster(tmp_path)
    result = cluster.secrets_script(RUN_NAMESPACE)
    assert result.returncode == 0, result.stdout + result.stderr
    first = cluster.secrets()
    assert set(first) == {NAMESPACE, RUN_NAMESPACE}
    # Random: another cluster got other values; long enough (MLflow wants passwords of 12+
    # characters); hex, so safe in the database URI and SeaweedFS's JSON identity file.
    for name, data in first[NAMESPACE].items():
        for key, value in data.items():
            assert value not in ("", "CHANGE_ME")
            if key != "MLFLOW_TRACKING_USERNAME":
                assert re.fullmatch(r"[0-9a-f]{20,}", value), (name, key, value)
                assert value != script_secrets[NAMESPACE][name][key], (name, key)
    # The run namespace holds copies of what pipeline tasks need.
    for name, data in first[RUN_NAMESPACE].items():
        assert data == first[NAMESPACE][name]
    # Run again (as after every apply): everything kept as it was.
    again = cluster.secrets_script(RUN_NAMESPACE)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "kept" in again.stdout and cluster.secrets() == first


def test_secrets_script_keeps_but_flags_an_old_change_me_template(tmp_path):
    """A cluster that applied the old Secret templates: the Secret is kept (PostgreSQL may have been
    initialised with it), and the script says that it still holds the placeholder."""
    cluster = FakeCluster(tmp_path)
    state = json.loads(cluster.state.read_text())
    state["secrets"][NAMESPACE] = {"sfddm-postgres": {"data": {
        "POSTGRES_PASSWORD": base64.b64encode(b"CHANGE_ME").decode()}}}
    cluster.state.write_text(json.dumps(state))
    result = cluster.secrets_script()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sfddm-postgres in sfddm still holds CHANGE_ME" in result.stderr
    assert cluster.secrets()[NAMESPACE]["sfddm-postgres"] == {"POSTGRES_PASSWORD": "CHANGE_ME"}
    assert "CHANGE_ME" not in json.dumps({n: d for n, d in cluster.secrets()[NAMESPACE].items() if n != "sfddm-postgres"})


def test_secrets_script_stops_without_the_namespaces(tmp_path):
    cluster = FakeCluster(tmp_path, namespaces=(NAMESPACE,))
    result = cluster.secrets_script("some-profile")
    assert result.returncode != 0 and "namespace some-profile does not exist" in result.stderr


def test_pipeline_tasks_get_secrets_that_the_script_creates_in_the_run_namespace(script_secrets):
    """Every Secret a compiled pipeline task takes as env exists, with its keys, where runs
    execute; MLflow credentials of the pipeline runner among them."""
    _, platform_spec = yaml.safe_load_all(COMPILED_PIPELINE.read_text())
    executors = platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors
    run_secrets = script_secrets[RUN_NAMESPACE]
    for name, config in executors.items():
        by_name = {}
        for source in config.get("secretAsEnv", []):
            secret = source["secretName"]
            assert secret in run_secrets, f"{name}: Secret {secret} is not created by k8s/secrets.sh"
            keys = {entry["secretKey"] for entry in source["keyToEnv"]}
            assert keys <= set(run_secrets[secret]), (name, secret)
            by_name[secret] = {entry["envVar"] for entry in source["keyToEnv"]}
        assert by_name.get("sfddm-mlflow-runner") == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}, name
    # The runner's Role may read exactly these Secrets by name.
    role = one(render("kfp-runs"), "Role", "sfddm-pipeline-runner")
    readable = {n for rule in role["rules"] if "secrets" in rule["resources"] for n in rule["resourceNames"]}
    assert set(run_secrets) <= readable


def test_readme_explains_install_next_to_kfp():
    readme = (K8S / "README.md").read_text()
    for needle in (
        "kubectl apply -k k8s/overlays/gpu",
        f"http://{MLFLOW_HOST}:5000",
        "k8s/secrets.sh",
        "sfddm-mlflow-runner",
        "basic-auth",
        "sfddm-pipeline-runner",
        "dvc remote",
        "docker build",
    ):
        assert needle in readme, needle
