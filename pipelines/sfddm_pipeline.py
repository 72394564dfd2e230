"""The sfddm Kubeflow pipeline: the stages of dvc.yaml as a DAG of components (components/).

    resolve_config -> prepare_data -+-> train_classifier ---------------------+
                   -> training_plan +-> train_teacher -+-> sample_teacher ----+-> evaluate -> register
                                                       +-> distill -----------+               -> promote

Settings: `params` is params.yaml as JSON (its content at compile time is the default), and `settings`
the keys a run changes, a YAML mapping of dotted keys as `sfddm --set` takes them ("{student.steps: 8}").
The registry's name and promotion gate are settings too (registry.model_name, registry.max_fid): the
promote step applies the same gate as `dvc repro`'s, and a refusal is its recorded outcome. Every
stage gets the whole resolved config: any change of settings re-runs every stage instead of risking a
stale result from KFP's cache (dvc.yaml, which lists each stage's keys, is the finer-grained cache).
GPU steps get the GPU profile (pipelines/gpu_profile.py); every step gets MLflow and object-store
settings from the run namespace (k8s/pipeline-runner) and the run id as SFDDM_PIPELINE_RUN, which groups
its MLflow runs.

Scale: `num_nodes` x `gpus_per_node` for the teacher and distill steps. At 1 x 1 (and for an imported
teacher) the step trains in its own pod with one GPU; beyond, the step submits a Kubeflow Trainer TrainJob
that runs torchrun on num_nodes pods and waits for it, at most the stage's budget (`teacher_budget_hours`,
`distill_budget_hours`) (pipelines/launcher.py, pipelines/trainjob.py). training_plan decides which, at
run time, and sizes the steps' pods to match: a step that waits for a TrainJob holds no GPU. Both steps
mount the ReadWriteMany claim `training_pvc` (k8s/overlays/kfp-runs) at trainjob.SHARED_MOUNT, where
training state lives under checkpoints/<stage>/<settings fingerprint>: a retried step (set_retry) resumes
it, in its pod or through a new TrainJob.
"""
import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

from kfp import compiler, dsl, kubernetes

import components
from components import image as image_lib
from sfddm_core import config

from . import gpu_profile, trainjob
# The run namespace's settings (names kept importable from here, as before they moved to settings.py).
from .settings import (CPU_STEP, DEFAULT_BUDGET_HOURS, GPU_STEP, MLFLOW_S3_ENV, MLFLOW_SECRET, MLFLOW_SECRET_ENV,
                       PIPELINE_RUN_ENV, RUN_ID_FIELD, S3_SECRET, S3_SECRET_ENV, SETTINGS_CONFIG_MAP, SETTINGS_ENV,
                       Resources)

PIPELINE_NAME = "sfddm"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"
COMPILED_PIPELINE = Path(__file__).with_name("sfddm_pipeline.yaml")


# Training steps are retried: a preempted or evicted node should not cost the whole run. The teacher and
# distill steps resume from their checkpoint on the training volume; the classifier (seconds) starts over.
TRAINING_RETRIES = 2
RETRY_BACKOFF = {"backoff_duration": "60s", "backoff_factor": 2.0, "backoff_max_duration": "600s"}
# Image references are immutable (components/image.py: a commit tag or a digest), so a node's copy is
# never stale and IfNotPresent saves a pull per task; a new build is a new reference, hence a new pull.
IMAGE_PULL_POLICY = "IfNotPresent"


def resolved_params(params_path: Union[str, Path] = DEFAULT_PARAMS, overrides: Optional[dict] = None) -> str:
    """params.yaml with dotted overrides, validated and with every default spelled out, as JSON."""
    return json.dumps(config.to_dict(config.load(params_path, overrides)))


def build_pipeline(params_path: Union[str, Path] = DEFAULT_PARAMS,
                   gpu: Optional[gpu_profile.GpuProfile] = None, image: Optional[str] = None,
                   shared_root: Union[str, Path] = trainjob.SHARED_MOUNT):
    """The pipeline function, with `params` defaulting to the content of params_path.

    image: the reference every task runs (checked by components/image.py: commit-tagged or a digest);
    needed to compile for a cluster, not for kfp.local, which runs the tasks in this environment.
    shared_root: where the training steps find the training volume: its mount path on a cluster; a local
    folder for kfp.local, which does not mount volumes (runs.run_local).
    """
    default_params = resolved_params(params_path)
    gpu = gpu or gpu_profile.load()
    image = image and image_lib.check(image)
    gpu_json = json.dumps(dataclasses.asdict(gpu), sort_keys=True)      # for the TrainJobs' pods

    def in_image(task: dsl.PipelineTask) -> dsl.PipelineTask:
        if image:
            task.set_container_image(image)
            kubernetes.set_image_pull_policy(task, IMAGE_PULL_POLICY)
        return task

    def on_cpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
        return _with_run_settings(_with_resources(in_image(task), CPU_STEP))

    def on_gpu(task: dsl.PipelineTask) -> dsl.PipelineTask:
        _with_resources(in_image(task), GPU_STEP)
        task.set_accelerator_type(gpu.accelerator_type).set_accelerator_limit(gpu.accelerator_limit)
        kubernetes.add_node_selector(task, gpu.node_selector_key, gpu.node_selector_value)
        kubernetes.add_toleration(task, key=gpu.toleration_key, operator=gpu.toleration_operator,
                                  effect=gpu.toleration_effect)
        return _with_run_settings(task)

    def on_training_pod(task: dsl.PipelineTask, plan: dsl.PipelineTask, stage: str,
                        pvc) -> dsl.PipelineTask:
        # The GPU pool as other GPU steps, but the GPU count, CPU and memory come from training_plan at run
        # time: a GPU step's when the step trains in its pod, none and a launcher's when it waits for a
        # TrainJob. after(): the resources' inputs are not task inputs, and kfp.local needs the order.
        in_image(task).after(plan)
        pod = {kind: plan.outputs[f"{stage}_{kind}"] for kind in ("gpus", "cpu", "memory")}
        task.set_cpu_request(pod["cpu"]).set_memory_request(pod["memory"]).set_memory_limit(pod["memory"])
        task.set_accelerator_type(gpu.accelerator_type).set_accelerator_limit(pod["gpus"])
        kubernetes.add_node_selector(task, gpu.node_selector_key, gpu.node_selector_value)
        kubernetes.add_toleration(task, key=gpu.toleration_key, operator=gpu.toleration_operator,
                                  effect=gpu.toleration_effect)
        kubernetes.mount_pvc(task, pvc_name=pvc, mount_path=trainjob.SHARED_MOUNT)
        return _with_run_settings(task)

    def retried(task: dsl.PipelineTask) -> dsl.PipelineTask:
        return task.set_retry(TRAINING_RETRIES, **RETRY_BACKOFF)

    def never_cached(task: dsl.PipelineTask) -> dsl.PipelineTask:
        # Registration and promotion act on the registry as it is now, not as it was last time.
        return task.set_caching_options(enable_caching=False)

    @dsl.pipeline(name=PIPELINE_NAME, description="Distil a many-step diffusion model into a few-step "
                  "student with SFDDM; evaluate, register and promote it in MLflow.")
    def sfddm_pipeline(
        params: str = default_params,
        settings: str = "",
        num_nodes: int = 1,
        gpus_per_node: int = 1,
        training_pvc: str = trainjob.DEFAULT_CLAIM,
        teacher_budget_hours: float = DEFAULT_BUDGET_HOURS,
        distill_budget_hours: float = DEFAULT_BUDGET_HOURS,
    ) -> int:
        cfg = on_cpu(components.resolve_config(params=params, settings=settings)).output
        dataset = on_cpu(components.prepare_data(config=cfg)).outputs["dataset"]
        classifier = retried(on_cpu(components.train_classifier(config=cfg, dataset=dataset)))
        plan = on_cpu(components.training_plan(config=cfg, num_nodes=num_nodes, gpus_per_node=gpus_per_node))
        scale = dict(num_nodes=num_nodes, gpus_per_node=gpus_per_node, shared_root=str(shared_root),
                     training_pvc=training_pvc, image=image or "", gpu_profile=gpu_json)
        teacher = retried(on_training_pod(components.train_teacher(
            config=cfg, dataset=dataset, budget_hours=teacher_budget_hours, **scale), plan, "teacher", training_pvc))
        teacher_model = teacher.outputs["teacher_model"]
        teacher_samples = on_gpu(components.sample_teacher(config=cfg, teacher_model=teacher_model))
        student = retried(on_training_pod(components.distill(
            config=cfg, teacher_model=teacher_model, dataset=dataset, budget_hours=distill_budget_hours, **scale),
            plan, "distill", training_pvc))
        student_model = student.outputs["student_model"]
        evaluation = on_gpu(components.evaluate(
            config=cfg, teacher_model=teacher_model, student_model=student_model,
            teacher_samples=teacher_samples.outputs["teacher_samples"], dataset=dataset,
            classifier=classifier.outputs["classifier"]))
        registration = never_cached(on_cpu(components.register(
            config=cfg, student_model=student_model, evaluation=evaluation.outputs["evaluation"],
            dataset=dataset)))
        never_cached(on_cpu(components.promote(config=cfg, model_version=registration.outputs["model_version"])))
        return registration.outputs["model_version"]

    return sfddm_pipeline


def _with_resources(task: dsl.PipelineTask, resources: Resources) -> dsl.PipelineTask:
    return task.set_cpu_request(resources.cpu).set_memory_request(resources.memory) \
        .set_memory_limit(resources.memory)


def _with_run_settings(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.use_config_map_as_env(task, SETTINGS_CONFIG_MAP, SETTINGS_ENV)
    kubernetes.use_config_map_as_env(task, SETTINGS_CONFIG_MAP, MLFLOW_S3_ENV)
    kubernetes.use_secret_as_env(task, S3_SECRET, S3_SECRET_ENV)
    kubernetes.use_secret_as_env(task, MLFLOW_SECRET, MLFLOW_SECRET_ENV)
    kubernetes.use_field_path_as_env(task, PIPELINE_RUN_ENV, RUN_ID_FIELD)
    return task


def compile_pipeline(path: Union[str, Path] = COMPILED_PIPELINE,
                     params_path: Union[str, Path] = DEFAULT_PARAMS, image: Optional[str] = None,
                     registry: Optional[str] = None) -> Path:
    """Write the pipeline package (YAML) to path; the same inputs always give the same bytes.

    image: the reference every task runs, commit-tagged or a digest; default registry/sfddm:git-<HEAD>
    (registry default ghcr.io/sfddm), refused while files that go into the image are uncommitted.
    """
    image = image_lib.resolve(image, registry)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(params_path, image=image), str(path))
    return path
