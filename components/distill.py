from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def distill(config: str, teacher_model: Input[Model], dataset: Input[Dataset], student_model: Output[Model],
            loss_log: Output[Dataset], num_nodes: int = 1, gpus_per_node: int = 1, shared_root: str = "",
            training_pvc: str = "", budget_hours: float = 0.0, image: str = "", gpu_profile: str = ""):
    """sfddm distill: SFDDM, the teacher distilled into a T'-step student in one fold.

    1 node x 1 GPU trains here; more launch a Kubeflow Trainer TrainJob running torchrun
    (pipelines/launcher.py). Training state lives under shared_root (the mounted training volume), so a
    retry resumes; "" keeps none (a bare call of the component).
    """
    import json

    from pipelines import launcher
    from sfddm_core import config as config_lib

    where = launcher.train_stage(
        "distill", config, data_dir=dataset.path, teacher_dir=teacher_model.path, out_dir=student_model.path,
        loss_csv=loss_log.path, num_nodes=num_nodes, gpus_per_node=gpus_per_node, shared_root=shared_root,
        image=image, claim=training_pvc, budget_hours=budget_hours, gpu_profile=gpu_profile)
    cfg = config_lib.from_dict(json.loads(config))
    student_model.metadata.update({"steps": cfg.student.steps, "phi": cfg.student_timesteps.tolist(),
                                   "trained_on": "this pod" if where.in_pod else
                                   f"{num_nodes} x {gpus_per_node} GPUs"})
