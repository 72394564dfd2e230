from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Model, Output

from sfddm_runtime.image import IMAGE

from .mlflow_link import mlflow_run_markdown


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[mlflow_run_markdown])
def train_teacher(config: str, dataset: Input[Dataset], teacher_model: Output[Model], loss_log: Output[Dataset],
                  mlflow_run: Output[Markdown], num_nodes: int = 1, gpus_per_node: int = 1, shared_root: str = "",
                  training_pvc: str = "", budget_hours: float = 0.0, image: str = "", gpu_profile: str = ""):
    """sfddm train-teacher: train the T-step teacher DDPM, or import the pretrained one.

    1 node x 1 GPU (or an import) trains here; more launch a Kubeflow Trainer TrainJob running torchrun
    (sfddm_runtime/launcher.py). Training state lives under shared_root (the mounted training volume), so a
    retry resumes; "" keeps none (a bare call of the component, a pipeline without the training volume).
    """
    import json
    from pathlib import Path

    from sfddm_runtime import launcher

    where = launcher.train_stage(
        "teacher", config, data_dir=dataset.path, out_dir=teacher_model.path, loss_csv=loss_log.path,
        num_nodes=num_nodes, gpus_per_node=gpus_per_node, shared_root=shared_root, image=image,
        claim=training_pvc, budget_hours=budget_hours, gpu_profile=gpu_profile)
    teacher_model.metadata["num_train_timesteps"] = json.loads(config)["teacher"]["num_train_timesteps"]
    teacher_model.metadata["trained_on"] = "this pod" if where.in_pod else f"{num_nodes} x {gpus_per_node} GPUs"
    Path(mlflow_run.path).write_text(mlflow_run_markdown("train_teacher"))
