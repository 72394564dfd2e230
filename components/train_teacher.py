from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_teacher(config: str, dataset: Input[Dataset], teacher_model: Output[Model],
                  loss_log: Output[Dataset]):
    """sfddm train-teacher: train the T-step teacher DDPM, or import the pretrained one."""
    import json
    from pathlib import Path

    from sfddm_core import config as config_lib, teacher, tracking

    cfg = config_lib.from_dict(json.loads(config))
    with tracking.stage_run("train_teacher", cfg):
        teacher.run(cfg, Path(dataset.path), Path(teacher_model.path), Path(loss_log.path))
        tracking.log_loss_csv(loss_log.path)
    teacher_model.metadata["num_train_timesteps"] = cfg.teacher.num_train_timesteps
