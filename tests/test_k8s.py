"""Checks of the Kubernetes manifests in k8s/ (kustomize).

Every kustomization (base and each overlay) is rendered with `kubectl kustomize` and
the rendered objects are checked: resources, pinned images, no Secrets (k8s/secrets.sh
makes them, run here against a stand-in kubectl), references between objects, probes,
the MLflow server settings, its authentication and schema upgrades, the object store and its
per-client S3 identities (the identity file rendered from the script's Secrets, judged by
SeaweedFS's permission rule), PostgreSQL, the network policies (evaluated against the pods'
labels), the GPU node profile, the GPU quota against the compiled pipeline's concurrent GPU
steps and Kueue's ClusterQueue (Kueue objects validated against its v0.19.2 CRDs), the
pipeline-runner RBAC against the calls the training launcher makes, the CPU-only path, and
what training TrainJobs need in the run namespace (tests/test_trainjob.py validates the
TrainingRuntime against the Trainer CRD).
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import inspect
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import yaml

from sfddm_runtime import settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBECTL = shutil.which("kubectl")

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")

NAMESPACE = "sfddm"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
# What pipeline runs need in KFP's run namespace: with GPUs and Kubeflow Trainer, or CPU-only.
RUN_OVERLAYS = ["kfp-runs", "kfp-runs-cpu"]
# Cluster-scoped objects, applied once by a cluster admin (Kueue's ClusterQueue).
CLUSTER_OVERLAYS = ["kueue"]
# Targets that deploy the sfddm stack (namespace sfddm).
STACKS = ["base"] + [o for o in OVERLAYS if o not in RUN_OVERLAYS + CLUSTER_OVERLAYS]
TARGETS = STACKS + RUN_OVERLAYS + CLUSTER_OVERLAYS
RUNNER_TARGETS = STACKS + RUN_OVERLAYS      # those with the pipeline-runner identity
RUN_NAMESPACE = "kubeflow"      # overlays/kfp-runs, and k8s/secrets.sh's default
KUEUE_SCHEMAS = Path(__file__).parent / "data" / "kueue-v0.19.2"
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


def test_every_overlay_is_a_known_target():
    assert sorted(TARGETS) == sorted(["base"] + OVERLAYS)


@pytest.mark.parametrize("target", TARGETS)
def test_everything_namespaced_in_one_namespace(target):
    expected = RUN_NAMESPACE if target in RUN_OVERLAYS else NAMESPACE
    for d in render(target):
        if d["kind"] == "Namespace":
            assert d["metadata"]["name"] == NAMESPACE
            continue
        if d["kind"] in KUEUE_KINDS and kueue_crd(d["kind"])["scope"] == "Cluster":
            # Cluster-scoped: no namespace (kustomize would add one to a kind it does not know).
            assert "namespace" not in d["metadata"], (d["kind"], d["metadata"]["name"])
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


@pytest.mark.parametrize("target", RUNNER_TARGETS)
def test_rbac_bindings_resolve(target):
    docs = render(target)
    for rb in find(docs, "RoleBinding"):
        assert rb["roleRef"]["kind"] == "Role"
        one(docs, "Role", rb["roleRef"]["name"])
        for s in rb["subjects"]:
            assert s["kind"] == "ServiceAccount"
            sa = one(docs, "ServiceAccount", s["name"])
            assert s["namespace"] == sa["metadata"]["namespace"] == rb["metadata"]["namespace"]


def role_rights(role: dict) -> dict:
    """{(API group, resource): verbs} that the Role grants (rules without resourceNames)."""
    rights: dict = {}
    for rule in role["rules"]:
        if rule.get("resourceNames"):
            continue
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rights.setdefault((group, resource), set()).update(rule["verbs"])
    return rights


@pytest.mark.parametrize("target", RUNNER_TARGETS)
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

    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in role["rules"])
    assert allows("workflowtaskresults", "create")
    assert allows("secrets", "get", settings.S3_SECRET)
    assert allows("secrets", "get", settings.MLFLOW_SECRET)
    assert not allows("secrets", "get", "sfddm-mlflow-s3")        # MLflow's own S3 key
    assert allows("configmaps", "get", "sfddm-pipeline-settings")
    assert allows("configmaps", "get", "sfddm-gpu-profile")
    # Read rights on secrets are limited to named ones.
    for rule in role["rules"]:
        if "secrets" in rule["resources"]:
            assert rule.get("resourceNames"), "secrets readable without resourceNames"
            assert set(rule["verbs"]) <= {"get"}
    # The pipeline creates and deletes no claims (no kfp-kubernetes CreatePVC / DeletePVC task).
    executors = next(yaml.safe_load_all(COMPILED_PIPELINE.read_text()))["deploymentSpec"]["executors"]
    assert not [name for name in executors if "createpvc" in name or "deletepvc" in name]
    assert not role_rights(role)[("", "persistentvolumeclaims")] & {"create", "delete", "update", "patch"}
    settings_map = one(docs, "ConfigMap", "sfddm-pipeline-settings")["data"]
    assert settings_map["MLFLOW_TRACKING_URI"] == f"http://{MLFLOW_HOST}:5000"
    assert settings_map["AWS_ENDPOINT_URL"] == "http://seaweedfs.sfddm.svc.cluster.local:8333"


class RecordingApi:
    """A stand-in for the kubernetes client's CustomObjectsApi or CoreV1Api that records the name and
    arguments of every call; only methods that the real class has can be called."""

    def __init__(self, real_class, calls: list, answers: dict):
        self._real, self._calls, self._answers = real_class, calls, answers

    def __getattr__(self, method):
        assert hasattr(self._real, method), f"{self._real.__name__} has no method {method}"

        def call(*args, **kwargs):
            self._calls.append((method, args))
            return self._answers.get(method)
        return call


# The kubernetes client's namespaced methods, as the API server's (resource, verb).
CLIENT_VERBS = {"create": "create", "get": "get", "read": "get", "patch": "patch", "replace": "update",
                "delete": "delete", "list": "list"}


def rights_of(calls: list) -> dict:
    """{(API group, resource): verbs} of recorded client calls."""
    rights: dict = {}
    for method, args in calls:
        m = re.fullmatch(r"(create|get|read|patch|replace|delete|list)_namespaced_(custom_object|pod_log|pod)", method)
        assert m, f"a client call this test cannot map to a right: {method}"
        verb, kind = CLIENT_VERBS[m[1]], m[2]
        # (group, version, namespace, plural, ...) for custom objects
        key = (args[0], args[3]) if kind == "custom_object" else ("", {"pod": "pods", "pod_log": "pods/log"}[kind])
        rights.setdefault(key, set()).add(verb)
    return rights


def test_runner_role_grants_exactly_what_the_launcher_calls():
    """Every method of sfddm_runtime/launcher.py's TrainJobs runs against recording stand-ins of the client
    APIs; the calls it makes, as (resource, verb), are granted by the runner's Role, and the Role grants
    nothing more on Kubeflow Trainer's resources or pod logs. (Pods' other verbs are KFP's.)"""
    from kubernetes import client

    from sfddm_runtime import launcher, trainjob

    calls: list = []
    rank0 = SimpleNamespace(metadata=SimpleNamespace(
        name="sfddm-distill-0123456789-node-0-0-abcde", creation_timestamp="2026-01-01T00:00:00Z",
        labels={launcher.JOBSET_LABEL: "sfddm-distill-0123456789", launcher.NODE_INDEX_LABEL: "0"}))
    jobs = launcher.TrainJobs(
        RUN_NAMESPACE, RecordingApi(client.CustomObjectsApi, calls, {"get_namespaced_custom_object": {}}),
        RecordingApi(client.CoreV1Api, calls, {"list_namespaced_pod": SimpleNamespace(items=[rank0]),
                                                "read_namespaced_pod_log": "2026-01-01T00:00:01Z step 1\n"}))
    name = "sfddm-distill-0123456789"
    arguments = {"name": name, "body": {"metadata": {"name": name}}, "tail_lines": 10, "queue": settings.TRAINING_QUEUE,
                 "owners": [trainjob.owner_reference("step-pod", "0000-1111")]}
    methods = [m for m, f in vars(launcher.TrainJobs).items() if callable(f) and not m.startswith("_")]
    assert {"create", "get", "delete", "rank0_log"} <= set(methods)
    for method in methods:
        parameters = list(inspect.signature(getattr(jobs, method)).parameters)
        unknown = set(parameters) - set(arguments)
        assert not unknown, f"TrainJobs.{method} takes {unknown}: give this test a value for it"
        getattr(jobs, method)(**{p: arguments[p] for p in parameters})
    used = rights_of(calls)
    assert used == launcher.API_RIGHTS, "launcher.API_RIGHTS differs from the calls TrainJobs makes"

    for target in RUNNER_TARGETS:
        granted = role_rights(one(render(target), "Role", "sfddm-pipeline-runner"))
        for key, verbs in used.items():
            assert verbs <= granted.get(key, set()), (target, key, verbs - granted.get(key, set()))
        trainer = {key: verbs for key, verbs in granted.items() if key[0] == trainjob.API_GROUP}
        assert trainer == {key: verbs for key, verbs in used.items() if key[0] == trainjob.API_GROUP}, target
        assert granted[("", "pods/log")] == used[("", "pods/log")], target
        # Pods: the launcher lists them; KFP's driver and Argo's executor get, watch and patch them.
        assert granted[("", "pods")] == used[("", "pods")] | {"get", "watch", "patch"}, target


def test_kfp_runs_overlays_target_kubeflow_without_secrets():
    for target in RUN_OVERLAYS:
        docs = render(target)
        assert not find(docs, "Secret"), f"{target} must not template Secrets (re-apply would overwrite them)"
        assert not workloads(docs)


# --------------------------------------------------------------------------- GPU budget and Kueue


KUEUE_KINDS = {"ResourceFlavor": "resourceflavors", "ClusterQueue": "clusterqueues", "LocalQueue": "localqueues"}


@functools.lru_cache(maxsize=None)
def kueue_crd(kind: str) -> dict:
    """Kueue's v1beta2 CRD schema of `kind` (tests/data/kueue-v0.19.2), with its scope."""
    plural = KUEUE_KINDS[kind]
    document = json.loads((KUEUE_SCHEMAS / f"kueue.x-k8s.io_{plural}.schema.json").read_text())
    assert document["crd"] == f"{plural}.kueue.x-k8s.io" and document["version"] == "v1beta2"
    assert "tag v0.19.2" in document["source"]
    scope = re.search(r"\(scope (Cluster|Namespaced)\)", document["source"])[1]
    return {**document, "scope": scope}


def kueue_problems(doc: dict) -> list[str]:
    """What the API server would refuse in a Kueue object: schema errors with unknown fields as errors
    (test_trainjob.strict), and the one CEL rule of these CRDs that an object like ours can break."""
    from test_trainjob import strict

    validator = jsonschema.Draft7Validator(strict(kueue_crd(doc["kind"])["openAPIV3Schema"]))
    found = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    for group in doc.get("spec", {}).get("resourceGroups", []):
        for flavor in group["flavors"]:
            # CEL "flavors must have the same number of resources as the coveredResources", and Kueue's
            # webhook: in the same order.
            if [r["name"] for r in flavor["resources"]] != group["coveredResources"]:
                found.append(f"flavor {flavor['name']}: resources differ from coveredResources")
    return found


def kueue_objects() -> dict:
    docs = render("kueue") + render("kfp-runs")
    return {kind: find(docs, kind) for kind in KUEUE_KINDS}


def test_kueue_objects_validate_against_the_crds():
    objects = kueue_objects()
    assert all(objects.values()), objects
    for kind, docs in objects.items():
        for doc in docs:
            assert doc["apiVersion"] == "kueue.x-k8s.io/v1beta2"
            assert kueue_problems(doc) == [], (kind, doc["metadata"]["name"])
    # Fields of the old v1beta1 API, or misspelt ones, are refused.
    [queue] = objects["ClusterQueue"]
    assert kueue_problems({**queue, "spec": {**queue["spec"], "cohort": "x"}})
    assert kueue_problems({**queue, "spec": {**queue["spec"], "resourceGroups": [
        {**queue["spec"]["resourceGroups"][0], "coveredResources": ["cpu"]}]}})


def test_trainjobs_queue_in_a_local_queue_of_the_run_namespace():
    """The LocalQueue that TrainJobs name (settings.TRAINING_QUEUE) is in the run namespace and feeds a
    ClusterQueue that admits from that namespace, with a flavor that exists."""
    from sfddm_runtime import trainjob

    objects = kueue_objects()
    [local] = objects["LocalQueue"]
    assert local["metadata"]["name"] == settings.TRAINING_QUEUE
    assert local["metadata"]["namespace"] == RUN_NAMESPACE
    [cluster_queue] = [q for q in objects["ClusterQueue"] if q["metadata"]["name"] == local["spec"]["clusterQueue"]]
    assert selects(cluster_queue["spec"]["namespaceSelector"], namespace_labels(RUN_NAMESPACE))
    assert not selects(cluster_queue["spec"]["namespaceSelector"], namespace_labels("default"))
    flavors = {f["metadata"]["name"] for f in objects["ResourceFlavor"]}
    assert {f["name"] for g in cluster_queue["spec"]["resourceGroups"] for f in g["flavors"]} <= flavors
    body = _largest_trainjob()
    assert body["metadata"]["labels"][trainjob.QUEUE_LABEL] == settings.TRAINING_QUEUE


def _largest_trainjob() -> dict:
    """The TrainJob of docs/kubeflow.md's largest example, distill on 2 nodes x 4 GPUs."""
    from sfddm_runtime import launcher
    from sfddm_core import config

    cfg = config.load(ROOT / "params.yaml")
    return launcher.review_manifest("distill", 2, 4, cfg, "ghcr.io/sfddm/sfddm:git-0123456789ab")


def cluster_queue_quota(cluster_queue: dict) -> dict:
    """{resource: nominal quota} of a ClusterQueue of one flavor per resource group."""
    quota = {}
    for group in cluster_queue["spec"]["resourceGroups"]:
        [flavor] = group["flavors"]
        for resource in flavor["resources"]:
            quota[resource["name"]] = quantity("cpu" if resource["name"] != "memory" else "memory",
                                               resource["nominalQuota"])
    return quota


def test_cluster_queue_admits_the_largest_trainjob_whole():
    """Kueue admits a TrainJob only when every resource its pods request is covered by the ClusterQueue
    and fits the quota: docs/kubeflow.md's 2 x 4 job does."""
    [cluster_queue] = [q for q in kueue_objects()["ClusterQueue"] if q["metadata"]["name"] == "sfddm-training"]
    quota = cluster_queue_quota(cluster_queue)
    trainer = _largest_trainjob()["spec"]["trainer"]
    for resource, value in trainer["resourcesPerNode"]["requests"].items():
        kind = "memory" if resource == "memory" else "cpu"
        assert resource in quota, f"{resource}: requested by TrainJob pods, not covered by the ClusterQueue"
        assert trainer["numNodes"] * quantity(kind, value) <= quota[resource], resource
    assert quota["nvidia.com/gpu"] >= 2 * 4


def pipeline_gpu_tasks() -> tuple[dict, dict, set]:
    """From the compiled pipeline: {GPU task: its GPU count, an int or "plan" for the training steps, which
    training_plan sizes at run time}, {task: the tasks it waits for, directly or not}, and the tasks that
    may start a TrainJob (the plan-sized ones)."""
    spec = next(yaml.safe_load_all(COMPILED_PIPELINE.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    gpus = {}
    for name, task in tasks.items():
        executor = spec["deploymentSpec"]["executors"][spec["components"][task["componentRef"]["name"]]["executorLabel"]]
        accelerator = executor["container"].get("resources", {}).get("accelerator")
        if accelerator:
            count = accelerator["resourceCount"]
            gpus[name] = "plan" if "pipelinechannel--training-plan-" in count else int(count)
    before = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    changed = True
    while changed:          # transitive closure
        changed = False
        for name in before:
            more = set().union(*(before[d] for d in before[name])) - before[name]
            if more:
                before[name] |= more
                changed = True
    return gpus, before, {name for name, count in gpus.items() if count == "plan"}


def concurrent_gpus(gpus: dict, before: dict, plan_gpus: int) -> int:
    """The most GPUs that the pipeline's pods hold at once: the heaviest set of GPU tasks no two of which
    wait for each other, the plan-sized ones counted at plan_gpus."""
    names = sorted(gpus)
    best = 0
    for size in range(1, len(names) + 1):
        for group in itertools.combinations(names, size):
            if all(a not in before[b] and b not in before[a] for a, b in itertools.combinations(group, 2)):
                best = max(best, sum(plan_gpus if gpus[n] == "plan" else gpus[n] for n in group))
    return best


def test_gpu_quota_fits_the_steps_that_run_at_once_beside_an_admitted_trainjob():
    """The run namespace's GPU quota holds what a run's pods request at once: its GPU steps that do not
    wait for each other (sample-teacher beside distill), the training steps sized by training_plan, plus,
    when a TrainJob trains, the ClusterQueue's whole GPU quota (Kueue admits TrainJobs within it). So an
    admitted TrainJob's pods are never refused by the quota, which would leave it half-started."""
    from sfddm_runtime import trainjob
    from sfddm_core import config

    docs = render("kfp-runs")
    runner = one(docs, "ServiceAccount", "sfddm-pipeline-runner")
    [quota] = [q for q in find(docs, "ResourceQuota") if "requests.nvidia.com/gpu" in q["spec"]["hard"]]
    assert quota["metadata"]["namespace"] == runner["metadata"]["namespace"] == RUN_NAMESPACE
    quota_gpus = quantity("cpu", quota["spec"]["hard"]["requests.nvidia.com/gpu"])

    gpus, before, trainers = pipeline_gpu_tasks()
    assert gpus and trainers
    # One TrainJob at a time in a run: the steps that can start one wait for each other.
    assert all(a in before[b] or b in before[a] for a, b in itertools.combinations(sorted(trainers), 2))
    cfg = config.load(ROOT / "params.yaml")
    in_pod = {trainjob.placement(cfg, stage, 1, 1).gpus for stage in trainjob.STAGES}
    on_trainer = {trainjob.placement(cfg, stage, 2, 4).gpus for stage in trainjob.STAGES}
    assert in_pod == {1} and on_trainer == {0}
    [cluster_queue] = [q for q in kueue_objects()["ClusterQueue"] if q["metadata"]["name"] == "sfddm-training"]
    trainjob_gpus = cluster_queue_quota(cluster_queue)["nvidia.com/gpu"]

    at_one_by_one = concurrent_gpus(gpus, before, 1)
    with_a_trainjob = concurrent_gpus(gpus, before, 0) + trainjob_gpus
    assert (at_one_by_one, with_a_trainjob) == (2, 1 + trainjob_gpus)     # as gpu-quota.yaml spells out
    assert quota_gpus == max(at_one_by_one, with_a_trainjob)
    # The stacks in namespace sfddm, where no pipeline pod runs, and the CPU-only path hold no GPU quota.
    for target in STACKS + ["kfp-runs-cpu"]:
        for q in find(render(target), "ResourceQuota"):
            assert "requests.nvidia.com/gpu" not in q["spec"]["hard"], (target, q["metadata"]["name"])


def test_cpu_only_path_needs_no_gpus_no_trainer_and_no_rwx_claim():
    """overlays/kfp-runs-cpu: the runner's identity and settings, and the training volume the pipeline
    mounts (its default training_pvc) as ReadWriteOnce from the default class; no GPU quota, Trainer
    runtime or Kueue queue."""
    from sfddm_runtime import trainjob

    docs = render("kfp-runs-cpu")
    one(docs, "ServiceAccount", "sfddm-pipeline-runner")
    one(docs, "ConfigMap", "sfddm-pipeline-settings")
    claim = one(docs, "PersistentVolumeClaim", trainjob.DEFAULT_CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "storageClassName" not in claim["spec"]       # the cluster's default class
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ResourceQuota", "TrainingRuntime", "LocalQueue", "ClusterQueue"}, kinds
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)
    # The kfp-runs overlay differs in what multi-node training needs, not in the runner's rights.
    full = render("kfp-runs")
    assert one(full, "Role", "sfddm-pipeline-runner")["rules"] == one(docs, "Role", "sfddm-pipeline-runner")["rules"]
    assert one(full, "PersistentVolumeClaim", trainjob.DEFAULT_CLAIM)["spec"]["accessModes"] == ["ReadWriteMany"]


def test_training_runtime_pods_get_no_istio_sidecar():
    """In a multi-user Kubeflow, profile namespaces inject Istio sidecars: the TrainJob pods opt out
    (torchrun's rendezvous and NCCL connect pod to pod, and a sidecar keeps a finished pod running)."""
    [runtime] = find(render("kfp-runs"), "TrainingRuntime")
    for job in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
        pod = job["template"]["spec"]["template"]
        assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false", job["name"]


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


# --------------------------------------------------------------------------- network and S3 keys


# Kubeflow Pipelines v2 puts this label on every pod of a run, drivers and tasks (the Argo workflow's
# podMetadata, backend/src/v2/compiler/argocompiler).
KFP_POD_LABELS = {"pipelines.kubeflow.org/v2_component": "true"}


def namespace_labels(namespace: str) -> dict:
    return {"kubernetes.io/metadata.name": namespace}        # the API server sets it on every namespace


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) applied to labels; {} selects all."""
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    if any(labels.get(key) != value for key, value in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        matched = {"In": key in labels and labels[key] in values,
                   "NotIn": key not in labels or labels[key] not in values,
                   "Exists": key in labels, "DoesNotExist": key not in labels}[operator]
        if not matched:
            return False
    return True


def admits(policy: dict, namespace: str, labels: dict, port: int) -> bool:
    """Whether ingress NetworkPolicy `policy` lets a pod with `labels` in `namespace` connect to TCP `port`
    of the pods it selects (a peer's podSelector alone means the policy's own namespace)."""
    for rule in policy["spec"].get("ingress", []):
        if rule.get("ports") and not any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in rule["ports"]):
            continue
        if not rule.get("from"):
            return True
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "a policy by address: this test only evaluates selectors"
            if "namespaceSelector" in peer:
                in_namespace = selects(peer["namespaceSelector"], namespace_labels(namespace))
            else:
                in_namespace = namespace == policy["metadata"]["namespace"]
            if in_namespace and selects(peer.get("podSelector", {}), labels):
                return True
    return False


@functools.lru_cache(maxsize=None)
def pipeline_pod_labels() -> dict:
    """The labels of a pipeline task's pod: KFP's, and those the compiled pipeline adds."""
    _, platform_spec = yaml.safe_load_all(COMPILED_PIPELINE.read_text())
    labels = dict(KFP_POD_LABELS)
    for executor in platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        labels.update(executor.get("podMetadata", {}).get("labels", {}))
    return labels


def client_pods(target: str) -> dict:
    """{name: (namespace, labels)} of the pods that could try to reach the stores: every pod template of
    the target, pipeline pods (KFP's labels plus the compiled pipeline's own) in the run namespace and in
    sfddm, a TrainJob's pods (the runtime's pod template and JobSet's labels), and strangers."""
    pods = {d["metadata"]["name"]: (NAMESPACE, pod_template_labels(d)) for d in workloads(render(target))}
    pipeline_labels = pipeline_pod_labels()
    pods["pipeline-pod"] = (RUN_NAMESPACE, pipeline_labels)
    pods["pipeline-pod-in-sfddm"] = (NAMESPACE, pipeline_labels)
    [runtime] = find(render("kfp-runs"), "TrainingRuntime")
    [node] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pods["trainjob-pod"] = (RUN_NAMESPACE, {**node["template"]["spec"]["template"].get("metadata", {}).get("labels", {}),
                                            "jobset.sigs.k8s.io/jobset-name": "sfddm-distill-0123456789",
                                            "jobset.sigs.k8s.io/replicatedjob-name": node["name"]})
    pods["another-team-pipeline-pod"] = ("another-team", pipeline_labels)
    pods["unlabelled-pod-in-run-namespace"] = (RUN_NAMESPACE, {"app": "something-else"})
    return pods


def reachable(target: str, policy_name: str, port: int) -> set:
    docs = render(target)
    policy = one(docs, "NetworkPolicy", policy_name)
    assert "Ingress" in policy["spec"]["policyTypes"]
    # The policy guards the pods of the workload of that name.
    guarded = [w for w in workloads(docs) if selects(policy["spec"]["podSelector"], pod_template_labels(w))]
    assert [w["metadata"]["name"] for w in guarded] == [policy_name]
    return {name for name, (namespace, labels) in client_pods(target).items()
            if name != policy_name and admits(policy, namespace, labels, port)}


@pytest.mark.parametrize("target", STACKS)
def test_only_mlflow_the_bucket_job_and_pipeline_pods_reach_the_object_store(target):
    assert reachable(target, "seaweedfs", 8333) == {"mlflow", "sfddm-create-buckets", "pipeline-pod",
                                                    "pipeline-pod-in-sfddm"}
    # SeaweedFS's master, volume and filer ports: nobody from outside its pod.
    for port in (9333, 8080, 8888):
        assert reachable(target, "seaweedfs", port) == set(), port


@pytest.mark.parametrize("target", STACKS)
def test_only_mlflow_reaches_postgres(target):
    """The MLflow pod: the server and its init containers, db-upgrade among them."""
    assert reachable(target, "postgres", 5432) == {"mlflow"}


# SeaweedFS's S3 actions (weed/s3api/s3_constants/s3_actions.go, 4.00) that a bucket request checks.
S3_ACTIONS = ("Read", "Write", "List", "Tagging", "Admin", "DeleteBucket", "ReadAcp", "WriteAcp")


def seaweedfs_allows(actions: list, action: str, bucket: str) -> bool:
    """SeaweedFS 4.00's permission check of an identity (weed/s3api/auth_credentials.go, Identity.canDo)
    for `action` on `bucket`: a global action or Admin, "Action:bucket", "Admin:bucket", or a prefix
    pattern ending in *."""
    if "Admin" in actions or action in actions:
        return True
    for granted in actions:
        if granted.endswith("*"):
            if f"{action}:{bucket}".startswith(granted[:-1]) or f"Admin:{bucket}".startswith(granted[:-1]):
                return True
        elif granted in (f"{action}:{bucket}", f"Admin:{bucket}"):
            return True
    return False


def rendered_s3_config(docs: list, secrets: dict, folder: Path) -> dict:
    """The identity file that the object store's init container writes, from the Secrets k8s/secrets.sh
    makes: its own script, run here with the env the pod would get."""
    store = one(docs, "StatefulSet", "seaweedfs")
    [init] = [c for c in pod_spec(store)["initContainers"] if c["name"] == "s3-config"]
    env = {}
    for entry in init["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets[ref["name"]][ref["key"]]
    server = container(docs, "StatefulSet", "seaweedfs", "seaweedfs")
    assert f"-s3.config={env['S3_CONFIG']}" in server["args"]
    mount = next(m["mountPath"] for m in init["volumeMounts"] if env["S3_CONFIG"].startswith(m["mountPath"] + "/"))
    assert {"name": "s3-config", "mountPath": mount, "readOnly": True} in server["volumeMounts"]
    env["S3_CONFIG"] = str(folder / "s3.json")
    assert init["command"] == ["/bin/sh", "-ec"]
    subprocess.run(["/bin/sh", "-ec", *init["args"]], env={"PATH": os.environ["PATH"], **env}, check=True, timeout=30)
    return json.loads((folder / "s3.json").read_text())


@pytest.mark.parametrize("target", STACKS)
def test_each_s3_key_acts_on_its_own_buckets_only(target, script_secrets, tmp_path):
    """Four identities from four Secrets, none global: the bucket Job's may create the two buckets, MLflow's
    reads and writes its artifact bucket, DVC's the DVC bucket, and the pipeline's reads the DVC bucket."""
    docs = render(target)
    secrets = script_secrets[NAMESPACE]
    config = rendered_s3_config(docs, secrets, tmp_path)
    by_key = {i["credentials"][0]["accessKey"]: i for i in config["identities"]}
    assert len(by_key) == len(config["identities"]) == 4
    job = one(docs, "Job", "sfddm-create-buckets")
    buckets = env_map(pod_spec(job)["containers"][0])["BUCKETS"]["value"].split()
    _, mlflow = _mlflow(target)
    mlflow_bucket = _option(mlflow, "--artifacts-destination", "MLFLOW_ARTIFACTS_DESTINATION").split("/")[2]
    dvc_bucket = one(docs, "ConfigMap", "sfddm-pipeline-settings")["data"]["DVC_REMOTE_URL"].split("/")[2]
    assert set(buckets) == {mlflow_bucket, dvc_bucket}
    everything = set(S3_ACTIONS)
    expected = {
        "sfddm-s3-admin": {(a, b) for a in everything for b in buckets},
        "sfddm-mlflow-s3": {(a, mlflow_bucket) for a in ("Read", "Write", "List")},
        "sfddm-dvc-s3": {(a, dvc_bucket) for a in ("Read", "Write", "List")},
        settings.S3_SECRET: {(a, dvc_bucket) for a in ("Read", "List")},
    }
    for secret, rights in expected.items():
        identity = by_key[secrets[secret]["AWS_ACCESS_KEY_ID"]]
        assert identity["credentials"][0]["secretKey"] == secrets[secret]["AWS_SECRET_ACCESS_KEY"]
        allowed = {(a, b) for a in S3_ACTIONS for b in buckets + ["another-bucket"]
                   if seaweedfs_allows(identity["actions"], a, b)}
        assert allowed == rights, secret

    # Each key goes to its client: the bucket Job, the MLflow server (test_mlflow_server_settings), the
    # pipeline tasks (settings.S3_SECRET, copied to the run namespace), and no other workload here.
    assert pod_spec(job)["containers"][0]["envFrom"] == [{"secretRef": {"name": "sfddm-s3-admin"}}]
    users = {}
    for doc, c in all_containers(docs):
        if (doc["kind"], c["name"]) == ("StatefulSet", "s3-config"):
            continue
        names = {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        names |= {ef["secretRef"]["name"] for ef in c.get("envFrom", []) if "secretRef" in ef}
        for name in names & set(expected):
            users.setdefault(name, set()).add(f"{doc['metadata']['name']}/{c['name']}")
    assert users == {"sfddm-s3-admin": {"sfddm-create-buckets/create-buckets"}, "sfddm-mlflow-s3": {"mlflow/mlflow"}}
    assert set(script_secrets[RUN_NAMESPACE]) == {settings.S3_SECRET, settings.MLFLOW_SECRET}


def test_pipeline_steps_take_no_s3_key_for_mlflow():
    """MLflow's artifacts go through the server (--serve-artifacts; clients get mlflow-artifacts: URIs),
    so pipeline steps need its S3 key nowhere: they take the pipeline's own key."""
    assert settings.S3_SECRET not in {"sfddm-mlflow-s3", "sfddm-dvc-s3", "sfddm-s3-admin"}
    _, mlflow = _mlflow("base")
    assert "--serve-artifacts" in mlflow["args"] and _option(mlflow, "--default-artifact-root", "") is None


@pytest.mark.parametrize("target", STACKS)
def test_mlflow_schema_is_upgraded_before_every_server_start(target):
    """`mlflow db upgrade` with the server's own image and database URI, in an init container after the
    database answers, and the old server stopped first (Recreate), on every rollout."""
    docs, server = _mlflow(target)
    deployment = one(docs, "Deployment", "mlflow")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    inits = pod_spec(deployment)["initContainers"]
    [upgrade] = [i for i in inits if (i.get("command", []) + i.get("args", []))[:3] == ["mlflow", "db", "upgrade"]]
    order = [i["name"] for i in inits]
    waiter = next(i["name"] for i in inits if "pg_isready" in " ".join(i.get("command", []) + i.get("args", [])))
    assert order.index(waiter) < order.index(upgrade["name"])
    assert upgrade["image"] == server["image"]
    [uri_argument] = (upgrade["command"] + upgrade["args"])[3:]
    variable = re.fullmatch(r"\$\((\w+)\)", uri_argument)[1]
    env, server_env = env_map(upgrade), env_map(server)
    assert env[variable]["value"] == _option(server, "--backend-store-uri", "MLFLOW_BACKEND_STORE_URI")
    names = [e["name"] for e in upgrade["env"]]
    for ref in re.findall(r"\$\((\w+)\)", env[variable]["value"]):
        assert env[ref] == server_env[ref], ref                     # the same Secret and ConfigMap keys
        assert names.index(ref) < names.index(variable)             # defined before use


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


def test_gpu_smoke_test_runs_the_pipeline_images_torch_on_a_gpu():
    """The check fails where the pipeline's GPU steps would: it runs their image (as serving does) and its
    `sfddm device --set device=cuda`, a matrix product by the image's own torch. nvidia-smi from a CUDA base
    image would pass on a driver too old for that torch's CUDA build."""
    from sfddm_cli import cli
    docs = render("gpu")
    spec = pod_spec(one(docs, "CronJob", "sfddm-gpu-smoke-test"))
    [check] = containers(spec)
    [server] = containers(pod_spec(one(kustomize(K8S / "serving"), "Deployment", "sfddm-serving")))
    assert check["image"] == server["image"] and check["image"].startswith("ghcr.io/sfddm/sfddm:")
    assert check["command"][0] == "sfddm"
    args = cli.build_parser().parse_args(check["command"][1:])
    assert args.command == "device" and dict(args.overrides) == {"device": "cuda"}
    dockerfile = (ROOT / "components" / "Dockerfile").read_text()
    assert f"USER {spec['securityContext']['runAsUser']}\n" in dockerfile
    home = {e["name"]: e.get("value") for e in check["env"]}["HOME"]
    assert check["securityContext"]["readOnlyRootFilesystem"] and home in {m["mountPath"] for m in check["volumeMounts"]}


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


@pytest.mark.integration       # k8s/secrets.sh against the stand-in kubectl
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


@pytest.mark.integration       # k8s/secrets.sh against the stand-in kubectl
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


@pytest.mark.integration       # k8s/secrets.sh against the stand-in kubectl
def test_secrets_script_flags_an_old_copy_of_mlflows_s3_key_in_the_run_namespace(tmp_path):
    """Earlier versions copied sfddm-mlflow-s3 to the run namespace for pipeline tasks; now only the
    MLflow server holds that key, so the script names the stale copy (and, as ever, deletes nothing)."""
    cluster = FakeCluster(tmp_path)
    state = json.loads(cluster.state.read_text())
    old = {"AWS_ACCESS_KEY_ID": "0" * 20, "AWS_SECRET_ACCESS_KEY": "1" * 48}
    state["secrets"][RUN_NAMESPACE] = {"sfddm-mlflow-s3": {"data": {
        k: base64.b64encode(v.encode()).decode() for k, v in old.items()}}}
    cluster.state.write_text(json.dumps(state))
    result = cluster.secrets_script()
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"kubectl -n {RUN_NAMESPACE} delete secret sfddm-mlflow-s3" in result.stderr
    assert cluster.secrets()[RUN_NAMESPACE]["sfddm-mlflow-s3"] == old


@pytest.mark.integration       # k8s/secrets.sh against the stand-in kubectl
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
        "k8s/overlays/kueue",
        "k8s/overlays/kfp-runs-cpu",
        "sfddm-dvc-s3",
        "mlflow db upgrade",
        "sidecar.istio.io/inject",
    ):
        assert needle in readme, needle
