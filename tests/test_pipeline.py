"""The Kubeflow pipeline: the committed package is what the code compiles to, its tasks carry the cluster
settings they need (the training steps: the training volume, and pods sized at run time for training in
place or waiting for a Kubeflow Trainer TrainJob), the whole DAG runs through kfp.local, and a submit to
nowhere fails fast."""
import csv
import difflib
import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml
from conftest import TINY_PARAMS

import components
from pipelines import run_local, submit
from pipelines.sfddm_pipeline import COMPILED_PIPELINE, REPO_ROOT, STEP_TIMEOUT_SECONDS, compile_pipeline
from sfddm_core.errors import SfddmError
from sfddm_core.tracking import flatten
from sfddm_runtime import gpu_profile, launcher, trainjob
from sfddm_runtime import image as image_lib
from sfddm_runtime.settings import CPU_STEP, GPU_STEP, POD_FIELDS

GPU_STEPS = {"train-teacher", "sample-teacher", "distill", "evaluate"}
CPU_STEPS = {"resolve-config", "prepare-data", "training-plan", "train-classifier", "register", "promote"}
TRAINING_STEPS = {"train-classifier", "train-teacher", "distill"}
# Steps that keep their training state on the training volume (a retry resumes) and may run as TrainJobs.
RESUMING_STEPS = {"train-teacher": "teacher", "distill": "distill"}
REGISTRY_STEPS = {"register", "promote"}


@pytest.fixture(scope="module")
def spec():
    """The committed pipeline package (test_committed_pipeline_is_a_fresh_compile vouches for it): the
    pipeline spec and the Kubernetes platform spec, two YAML documents, as one mapping."""
    pipeline_spec, platform_spec = yaml.safe_load_all(COMPILED_PIPELINE.read_text())
    return {**pipeline_spec, **platform_spec}


def executors(spec):
    return {name.removeprefix("exec-"): executor["container"]
            for name, executor in spec["deploymentSpec"]["executors"].items()}


def k8s_executors(spec):
    return {name.removeprefix("exec-"): config
            for name, config in spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items()}


def tasks(spec):
    """Every task of the DAG, those inside the dsl.If included, by name."""
    found = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        found.update(component.get("dag", {}).get("tasks", {}))
    return found


def committed_image(spec):
    [image] = {container["image"] for container in executors(spec).values()}
    return image


def test_committed_pipeline_is_a_fresh_compile(spec, tmp_path):
    # A fresh interpreter without compile-time settings. The image is the one thing that differs between
    # commits (it names the commit it was compiled at, so it can never name the commit that holds it):
    # compile with the committed one; test_every_step_runs_the_one_image_and_installs_nothing checks it.
    env = {key: value for key, value in os.environ.items() if key != "SFDDM_GPU_PROFILE"}
    fresh = tmp_path / "sfddm_pipeline.yaml"
    script = (f"from pipelines import compile_pipeline; "
              f"compile_pipeline({str(fresh)!r}, image={committed_image(spec)!r})")
    subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, check=True)
    committed, compiled = COMPILED_PIPELINE.read_text(), fresh.read_text()
    diff = "".join(list(difflib.unified_diff(committed.splitlines(True), compiled.splitlines(True),
                                             "committed", "fresh compile"))[:60])
    assert committed == compiled, (f"{COMPILED_PIPELINE} is stale: run `make pipeline` (or `sfddm pipeline compile "
                                  f"--image REF` while image files are uncommitted)\n{diff}")


def test_every_step_runs_the_one_image_and_installs_nothing(spec):
    image = committed_image(spec)
    assert image_lib.check(image) == image      # commit-tagged or a digest, never a moving tag
    if "@" not in image:                        # the commit it names is this one or an earlier one
        sha = image.rpartition(":" + image_lib.COMMIT_TAG_PREFIX)[2]
        subprocess.run(["git", "merge-base", "--is-ancestor", sha, "HEAD"], cwd=REPO_ROOT, check=True)
    for name, container in executors(spec).items():
        assert container["image"] == image, name
        assert "pip install" not in " ".join(container["command"] + container.get("args", [])), name
    for name, config in k8s_executors(spec).items():
        assert config["imagePullPolicy"] == "IfNotPresent", name       # right for an immutable reference
    assert set(executors(spec)) == set(k8s_executors(spec)) == GPU_STEPS | CPU_STEPS


def test_gpu_steps_get_a_gpu_on_the_gpu_pool_and_cpu_steps_do_not(spec):
    profile = gpu_profile.load()        # the repository's sfddm-gpu-profile ConfigMap
    k8s = k8s_executors(spec)
    for name, container in executors(spec).items():
        resources = container["resources"]
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"], name
        assert resources["resourceMemoryLimit"] == resources["resourceMemoryRequest"], name
        if name in GPU_STEPS:
            assert resources["accelerator"]["resourceType"] == profile.accelerator_type == "nvidia.com/gpu"
            if name in RESUMING_STEPS:      # 1 or 0 at run time (test_training_steps_...)
                assert resources["accelerator"]["resourceCount"] == plan_output(RESUMING_STEPS[name], "gpus")
            else:
                assert int(resources["accelerator"]["resourceCount"]) == profile.accelerator_limit == 1
            assert k8s[name]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
            assert k8s[name]["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        else:
            assert "accelerator" not in resources, name
            assert "nodeSelector" not in k8s[name] and "tolerations" not in k8s[name], name


def test_every_step_gets_mlflow_and_store_settings_and_the_run_id(spec):
    for name, config in k8s_executors(spec).items():
        assert {source["configMapName"] for source in config["configMapAsEnv"]} == {"sfddm-pipeline-settings"}
        env = {entry["envVar"]: entry["configMapKey"] for source in config["configMapAsEnv"]
               for entry in source["keyToEnv"]}
        assert env["MLFLOW_TRACKING_URI"] == "MLFLOW_TRACKING_URI", name
        assert env["AWS_ENDPOINT_URL"] == "AWS_ENDPOINT_URL", name
        assert "MLFLOW_S3_ENDPOINT_URL" not in env, name        # MLflow's artifacts go through its server
        secrets = {s["secretName"]: {e["envVar"] for e in s["keyToEnv"]} for s in config["secretAsEnv"]}
        assert secrets == {"sfddm-pipeline-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
                           "sfddm-mlflow-runner": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}}, name
        # The MLflow UI's address for the steps' links: optional, so a ConfigMap without it starts the pod.
        [ui] = [source for source in config["configMapAsEnv"] if source.get("optional")]
        assert ui["keyToEnv"] == [{"configMapKey": "SFDDM_MLFLOW_UI_URL", "envVar": "SFDDM_MLFLOW_UI_URL"}], name
        assert all(not source.get("optional") for source in config["configMapAsEnv"] if source is not ui), name
        # The training steps (which may create a TrainJob, owned by their pod) also know their pod.
        pod = [{"fieldPath": path, "name": env} for env, path in POD_FIELDS.items()] if name in RESUMING_STEPS else []
        assert sorted(config["fieldPathAsEnv"], key=str) == sorted(
            [{"fieldPath": "metadata.labels['pipeline/runid']", "name": "SFDDM_PIPELINE_RUN"}, *pod], key=str), name


def plan_output(stage: str, kind: str) -> str:
    return f"{{{{$.inputs.parameters['pipelinechannel--training-plan-{stage}_{kind}']}}}}"


def test_training_steps_mount_the_training_volume_and_size_their_pods_at_run_time(spec):
    k8s, containers, all_tasks = k8s_executors(spec), executors(spec), tasks(spec)
    profile = gpu_profile.load()
    for name, stage in RESUMING_STEPS.items():
        # The claim named by the training_pvc parameter, at the path the TrainJobs mount it too.
        assert k8s[name]["pvcMount"] == [{"componentInputParameter": "training_pvc", "mountPath": "/sfddm-shared",
                                          "pvcNameParameter": {"componentInputParameter": "training_pvc"}}]
        resources = containers[name]["resources"]
        assert resources["resourceCpuRequest"] == plan_output(stage, "cpu")
        assert resources["resourceMemoryRequest"] == resources["resourceMemoryLimit"] == plan_output(stage, "memory")
        task = all_tasks[name]
        assert "training-plan" in task["dependentTasks"]
        inputs = task["inputs"]["parameters"]
        constant = {key: value["runtimeValue"]["constant"] for key, value in inputs.items() if "runtimeValue" in value}
        assert constant["shared_root"] == trainjob.SHARED_MOUNT
        assert constant["image"] == committed_image(spec)           # the TrainJob runs the step's image
        assert json.loads(constant["gpu_profile"]) == profile.__dict__
        assert {key: inputs[key]["componentInputParameter"] for key in
                ("num_nodes", "gpus_per_node", "training_pvc", "budget_hours")} == {
            "num_nodes": "num_nodes", "gpus_per_node": "gpus_per_node", "training_pvc": "training_pvc",
            "budget_hours": f"{stage}_budget_hours"}
    for name in set(k8s) - set(RESUMING_STEPS):
        assert "pvcMount" not in k8s[name], name


BUDGETS = dict(teacher_budget_hours=24.0, distill_budget_hours=24.0, max_budget_hours=72.0)


def test_training_plan_sizes_the_training_pods():
    config = components.resolve_config.python_func(params=json.dumps(TINY_PARAMS), settings="")
    here = components.training_plan.python_func(config=config, num_nodes=1, gpus_per_node=1, **BUDGETS)
    assert here._asdict() == {"teacher_gpus": 1, "teacher_cpu": GPU_STEP.cpu, "teacher_memory": GPU_STEP.memory,
                              "distill_gpus": 1, "distill_cpu": GPU_STEP.cpu, "distill_memory": GPU_STEP.memory}
    # Waiting for a TrainJob of 2 x 4 GPUs holds no GPU, and no more than a CPU step's memory.
    away = components.training_plan.python_func(config=config, num_nodes=2, gpus_per_node=4, **BUDGETS)
    assert (away.teacher_gpus, away.distill_gpus) == (0, 0)
    assert int(away.distill_cpu) <= int(CPU_STEP.cpu) and away.distill_memory == CPU_STEP.memory
    with pytest.raises(SfddmError, match="does not divide"):       # before any GPU is taken
        components.training_plan.python_func(config=config, num_nodes=3, gpus_per_node=1, **BUDGETS)
    for budget in (0.0, 72.5):      # a budget beyond the step timeout's, refused before any GPU is taken
        with pytest.raises(SfddmError, match=f"distill_budget_hours: expected more than 0 and at most 72 hours.*"
                                             f"got {budget:g}"):
            components.training_plan.python_func(config=config, num_nodes=2, gpus_per_node=4,
                                                 **{**BUDGETS, "distill_budget_hours": budget})
    # Built without the training volume: 1 x 1 trains in place; a TrainJob is refused before any GPU is taken.
    assert components.training_plan.python_func(config=config, num_nodes=1, gpus_per_node=1, training_volume=False,
                                                **BUDGETS) == here
    with pytest.raises(SfddmError, match="teacher on 2 x 4 GPUs needs a TrainJob.*--no-training-volume"):
        components.training_plan.python_func(config=config, num_nodes=2, gpus_per_node=4, training_volume=False,
                                             **BUDGETS)


def test_every_step_has_a_timeout_and_training_steps_outlast_the_launchers_deadline(spec):
    """The pod's activeDeadlineSeconds: the training steps' exceeds the largest budget training_plan accepts
    plus the launcher's grace, so the launcher reaches its own deadline (and deletes its TrainJob) first."""
    k8s, all_tasks = k8s_executors(spec), tasks(spec)
    [max_budget] = {all_tasks["training-plan"]["inputs"]["parameters"]["max_budget_hours"]["runtimeValue"]["constant"]}
    for name, config in k8s.items():
        timeout = int(config["activeDeadlineSeconds"])
        if name in RESUMING_STEPS:
            assert timeout > max_budget * 3600 + launcher.GRACE_SECONDS, name
        else:
            assert timeout == STEP_TIMEOUT_SECONDS[name], name
    described = spec["root"]["inputDefinitions"]["parameters"]["distill_budget_hours"]["description"]
    assert f"at most {max_budget:g}" in described


def test_every_pipeline_parameter_is_described_for_the_kfp_ui(spec):
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    for name, parameter in parameters.items():
        assert parameter.get("description", "").strip(), name
    assert "{student.steps: 8" in parameters["settings"]["description"]


def test_distill_measures_fid_along_distillation_with_the_classifier(spec):
    distill = tasks(spec)["distill"]
    assert distill["inputs"]["artifacts"]["classifier"]["taskOutputArtifact"] == {
        "outputArtifactKey": "classifier", "producerTask": "train-classifier"}
    outputs = spec["components"]["comp-distill"]["outputDefinitions"]["artifacts"]
    assert {name: outputs[name]["artifactType"]["schemaTitle"] for name in ("fid_log", "fid_curve", "metrics")} == \
        {"fid_log": "system.Dataset", "fid_curve": "system.HTML", "metrics": "system.Metrics"}
    # Every step whose stage opens an MLflow run links to it.
    for name, component in spec["components"].items():
        if name.removeprefix("comp-") in GPU_STEPS | CPU_STEPS - {"resolve-config", "training-plan"}:
            assert component["outputDefinitions"]["artifacts"]["mlflow_run"]["artifactType"]["schemaTitle"] == \
                "system.Markdown", name


def test_variant_without_training_volume_or_gpus_needs_neither(tmp_path):
    """--no-training-volume --cpu-only: no claim mounted (training in place keeps no checkpoint), no GPU or
    GPU pool requested; timeouts and the rest as in the default build."""
    path = compile_pipeline(tmp_path / "p.yaml", image="ghcr.io/sfddm/sfddm:git-0123456789ab",
                            training_volume=False, cpu_only=True, max_budget_hours=10)
    pipeline_spec, platform_spec = yaml.safe_load_all(path.read_text())
    variant = {**pipeline_spec, **platform_spec}
    for name, config in k8s_executors(variant).items():
        assert "pvcMount" not in config and "nodeSelector" not in config and "tolerations" not in config, name
        assert "accelerator" not in executors(variant)[name]["resources"], name
    for name in RESUMING_STEPS:
        constant = {key: value["runtimeValue"]["constant"] for key, value in
                    tasks(variant)[name]["inputs"]["parameters"].items() if "runtimeValue" in value}
        assert constant["shared_root"] == constant["training_pvc"] == constant["gpu_profile"] == "", name
        assert int(k8s_executors(variant)[name]["activeDeadlineSeconds"]) > 10 * 3600 + launcher.GRACE_SECONDS
    assert "unused" in variant["root"]["inputDefinitions"]["parameters"]["training_pvc"]["description"]


def test_training_retries_and_registry_steps_are_never_cached(spec):
    for name, task in tasks(spec).items():
        if name in TRAINING_STEPS:
            assert task["retryPolicy"] == {"maxRetryCount": 2, "backoffDuration": "60s", "backoffFactor": 2.0,
                                           "backoffMaxDuration": "600s"}, name
        else:
            assert "retryPolicy" not in task, name
        assert task["cachingOptions"].get("enableCache", False) is (name not in REGISTRY_STEPS), name


def test_promote_applies_the_registry_gate_of_the_resolved_config(spec):
    """One gate for both drivers: the promote step gets the config (registry.max_fid, model name) and
    runs after register, as `dvc repro`'s promote stage does."""
    promote = tasks(spec)["promote"]
    assert promote["inputs"]["parameters"]["config"]["taskOutputParameter"]["producerTask"] == "resolve-config"
    assert "register" in promote["dependentTasks"]


def test_params_default_is_the_resolved_params_yaml(spec):
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert json.loads(inputs["params"]["defaultValue"])["teacher"]["num_train_timesteps"] == 1000
    assert inputs["settings"]["defaultValue"] == ""       # settings live in params (one source)
    assert set(inputs) == {"params", "settings", "num_nodes", "gpus_per_node", "training_pvc",
                           "teacher_budget_hours", "distill_budget_hours"}
    scale = {name: inputs[name]["defaultValue"] for name in
             ("num_nodes", "gpus_per_node", "training_pvc", "teacher_budget_hours", "distill_budget_hours")}
    assert scale == {"num_nodes": 1, "gpus_per_node": 1, "training_pvc": "sfddm-training",
                     "teacher_budget_hours": 24.0, "distill_budget_hours": 24.0}


def test_gpu_profile_reads_configmap_data_and_names_missing_keys(tmp_path):
    data = yaml.safe_load((REPO_ROOT / "k8s/overlays/gpu/gpu-profile.yaml").read_text())["data"]
    (tmp_path / "data.json").write_text(json.dumps(data))       # kubectl ... -o jsonpath='{.data}'
    assert gpu_profile.load(tmp_path / "data.json") == gpu_profile.load()
    del data["gpu_toleration_effect"]
    (tmp_path / "partial.json").write_text(json.dumps(data))
    with pytest.raises(SfddmError, match="lacks gpu_toleration_effect"):
        gpu_profile.load(tmp_path / "partial.json")


def test_unknown_pipeline_argument_is_refused_before_running(tmp_path):
    with pytest.raises(SfddmError, match="unknown pipeline parameter 'student_step'"):
        run_local(pipeline_root=tmp_path, arguments={"student_step": 8})


def test_submit_to_an_unreachable_host_fails_after_one_bounded_probe_with_one_line(monkeypatch):
    """Nothing listens at the host: one TCP probe with a timeout, then one line; kfp's client (whose
    health check has no timeout and retries) is never made, and nothing sleeps for a retry."""
    import socket

    import kfp
    probes, connect = [], socket.create_connection

    def probe(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        return connect(address, timeout, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", probe)
    monkeypatch.setattr(kfp, "Client", lambda *args, **kwargs: pytest.fail("kfp.Client made for an unreachable host"))
    monkeypatch.setattr(time, "sleep", lambda seconds: pytest.fail(f"slept {seconds} s: a retry's back-off"))
    with pytest.raises(SfddmError) as error:
        submit("http://127.0.0.1:1", arguments={"settings": {"student.steps": 8, "registry.max_fid": 40}},
               image="ghcr.io/sfddm/sfddm:git-0123456789ab")
    assert len(probes) == 1 and probes[0][0] == ("127.0.0.1", 1), probes
    assert isinstance(probes[0][1], (int, float)) and 0 < probes[0][1] <= 15     # a bounded wait
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "127.0.0.1:1" in message and "unreachable" in message


@pytest.mark.integration
def test_whole_pipeline_runs_locally_and_registers_a_champion(tmp_path, monkeypatch):
    import mlflow

    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.delenv("SFDDM_PIPELINE_RUN", raising=False)
    monkeypatch.delenv("SFDDM_TRACKING", raising=False)        # conftest turns it off for other tests
    started = time.monotonic()
    # The settings parameter takes T from 100 to 25: it checks that pipeline settings reach the
    # stages (the registry's too), and cuts the teacher's sampling over all T steps to a quarter.
    version = run_local(overrides=flatten(TINY_PARAMS), pipeline_root=tmp_path / "runs",
                        arguments={"settings": "{teacher.num_train_timesteps: 25, registry.model_name: sfddm-tiny, "
                                               "registry.max_fid: 1000000}"})
    print(f"local pipeline run: {time.monotonic() - started:.0f} s")

    assert version == 1
    client = mlflow.MlflowClient(tracking_uri)
    champion = client.get_model_version_by_alias("sfddm-tiny", "champion")
    assert int(champion.version) == 1 and champion.tags["T"] == "25"
    [run_dir] = [path for path in (tmp_path / "runs").iterdir() if path.name != "shared"]   # "shared": the
    # training volume's stand-in, where the training steps kept their checkpoints while they ran
    assert not list((tmp_path / "runs" / "shared").rglob("state*.pt"))
    decision = json.loads((run_dir / "promote" / "decision").read_text())
    assert decision["promoted"] is True and decision["champion_version"] == 1
    assert "| student (SFDDM) | 4 |" in (run_dir / "evaluate" / "fid_table").read_text()
    assert (run_dir / "evaluate" / "sample_grids").read_text().count("data:image/png;base64,") == 5
    # All stage runs of this pipeline execution hang under one parent run in MLflow.
    mlflow.set_tracking_uri(tracking_uri)       # an earlier in-process test may have set another one
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parents = {run.data.tags.get("mlflow.parentRunId") for run in runs if "sfddm.stage" in run.data.tags}
    assert len(parents) == 1 and None not in parents
    # Each step with a stage names its MLflow run (a link, where the tracking URI or SFDDM_MLFLOW_UI_URL is
    # a server's address).
    stage_of_run = {run.info.run_id: run.data.tags["sfddm.stage"] for run in runs if "sfddm.stage" in run.data.tags}
    for task, stage in {"prepare-data": "prepare", "train-classifier": "train_classifier",
                        "train-teacher": "train_teacher", "sample-teacher": "sample_teacher", "distill": "distill",
                        "evaluate": "evaluate", "register": "register", "promote": "promote"}.items():
        text = (run_dir / task / "mlflow_run").read_text()
        [run_id] = re.findall(r"\brun ([0-9a-f]{32})\b", text)
        assert stage_of_run[run_id] == stage, (task, text)
    # The FID curve along distillation, as `dvc repro`'s distill stage writes it: the CSV and its plot.
    with open(run_dir / "distill" / "fid_log", newline="") as handle:
        curve = list(csv.DictReader(handle))
    assert len(curve) >= 2 and list(curve[0]) == ["step", "fid", "kid"]
    page = (run_dir / "distill" / "fid_curve").read_text()
    assert "<svg" in page and f"<td>{curve[-1]['step']}</td>" in page
