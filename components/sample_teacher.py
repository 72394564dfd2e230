from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Model, Output

from sfddm_runtime.image import IMAGE

from .mlflow_link import mlflow_run_markdown


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[mlflow_run_markdown])
def sample_teacher(config: str, teacher_model: Input[Model], teacher_samples: Output[Dataset],
                   mlflow_run: Output[Markdown]):
    """sfddm sample-teacher: the teacher's DDPM and DDIM samples over all T steps, the references
    that evaluate measures the student against."""
    import json
    from pathlib import Path

    from sfddm_core import config as config_lib, stages

    stages.sample_teacher(config_lib.from_dict(json.loads(config)), Path(teacher_model.path),
                          Path(teacher_samples.path))
    Path(mlflow_run.path).write_text(mlflow_run_markdown("sample_teacher"))
