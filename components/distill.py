from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from sfddm_runtime.image import IMAGE

from .mlflow_link import mlflow_run_markdown
from .reports import fid_curve_html


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[mlflow_run_markdown, fid_curve_html])
def distill(config: str, teacher_model: Input[Model], dataset: Input[Dataset], classifier: Input[Model],
            student_model: Output[Model], loss_log: Output[Dataset], fid_log: Output[Dataset],
            fid_curve: Output[HTML], metrics: Output[Metrics], mlflow_run: Output[Markdown], num_nodes: int = 1,
            gpus_per_node: int = 1, shared_root: str = "", training_pvc: str = "", budget_hours: float = 0.0,
            image: str = "", gpu_profile: str = ""):
    """sfddm distill --classifier: SFDDM, the teacher distilled into a T'-step student in one fold, and the
    FID curve along distillation (`fid_log`, the CSV that dvc's distill stage writes; `fid_curve`, its
    plot; `metrics`, its last point), measured with the FID classifier.

    1 node x 1 GPU trains here; more launch a Kubeflow Trainer TrainJob running torchrun
    (sfddm_runtime/launcher.py). Training state lives under shared_root (the mounted training volume), so a
    retry resumes; "" keeps none (a bare call of the component, a pipeline without the training volume).
    """
    import csv
    import json
    from pathlib import Path

    from sfddm_core import config as config_lib
    from sfddm_runtime import launcher

    where = launcher.train_stage(
        "distill", config, data_dir=dataset.path, teacher_dir=teacher_model.path, out_dir=student_model.path,
        loss_csv=loss_log.path, classifier=classifier.path, fid_csv=fid_log.path, num_nodes=num_nodes,
        gpus_per_node=gpus_per_node, shared_root=shared_root, image=image, claim=training_pvc,
        budget_hours=budget_hours, gpu_profile=gpu_profile)
    cfg = config_lib.from_dict(json.loads(config))
    student_model.metadata.update({"steps": cfg.student.steps, "phi": cfg.student_timesteps.tolist(),
                                   "trained_on": "this pod" if where.in_pod else
                                   f"{num_nodes} x {gpus_per_node} GPUs"})
    what = (f"FID and KID from {cfg.evaluate.num_samples} samples of the student at each point against the test "
            f"split of {cfg.data.source}, features: {cfg.evaluate.feature_network}.")
    Path(fid_curve.path).write_text(fid_curve_html(fid_log.path, what))
    with open(fid_log.path, newline="") as handle:
        last = list(csv.DictReader(handle))[-1]
    metrics.log_metric("fid_at_end", float(last["fid"]))
    metrics.log_metric("kid_at_end", float(last["kid"]))
    metrics.log_metric("updates", int(last["step"]))
    Path(mlflow_run.path).write_text(mlflow_run_markdown("distill"))
