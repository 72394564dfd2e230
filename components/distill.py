from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def distill(config: str, teacher_model: Input[Model], dataset: Input[Dataset], student_model: Output[Model],
            loss_log: Output[Dataset]):
    """sfddm distill: SFDDM, the teacher distilled into a T'-step student in one fold."""
    import json
    from pathlib import Path

    from sfddm_core import config as config_lib, distill, tracking

    cfg = config_lib.from_dict(json.loads(config))
    with tracking.stage_run("distill", cfg):
        distill.run(cfg, Path(teacher_model.path), Path(dataset.path), Path(student_model.path),
                    Path(loss_log.path))
        tracking.log_loss_csv(loss_log.path)
    student_model.metadata.update({"steps": cfg.student.steps, "phi": cfg.student_timesteps.tolist()})
