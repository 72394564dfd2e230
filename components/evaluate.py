from kfp import dsl
from kfp.dsl import Artifact, Dataset, HTML, Input, Markdown, Metrics, Model, Output

from sfddm_runtime.image import IMAGE

from .mlflow_link import mlflow_run_markdown
from .reports import fid_table_markdown, sample_grids_html


@dsl.component(base_image=IMAGE, install_kfp_package=False,
               additional_funcs=[mlflow_run_markdown, fid_table_markdown, sample_grids_html])
def evaluate(config: str, teacher_model: Input[Model], student_model: Input[Model],
             teacher_samples: Input[Dataset], dataset: Input[Dataset], classifier: Input[Model],
             metrics: Output[Metrics], evaluation: Output[Artifact], fid_table: Output[Markdown],
             sample_grids: Output[HTML], mlflow_run: Output[Markdown]) -> float:
    """sfddm evaluate: FID, speed and consistency of the student against the teacher's two baselines.

    `evaluation` holds evaluate.json and the PNGs (images/), `metrics` the same numbers for the KFP UI.
    Returns the student's FID, which gates promotion. (A single unnamed output: kfp.local resolves a
    dsl.If condition on a task's "Output" but not on a named output.)
    """
    import json
    from pathlib import Path

    from sfddm_core import config as config_lib, data, stages, tracking

    image_dir = Path(evaluation.path) / "images"
    results = stages.evaluate(config_lib.from_dict(json.loads(config)), Path(teacher_model.path),
                              Path(student_model.path), Path(teacher_samples.path), Path(dataset.path),
                              Path(classifier.path), Path(evaluation.path) / "evaluate.json", image_dir)
    for name, value in tracking.flatten(results).items():
        if isinstance(value, (int, float)):
            metrics.log_metric(name, value)
    meta = data.load_meta(dataset.path)
    reference = f"the test split of {meta['source']} ({meta['counts']['test']} images)"
    Path(fid_table.path).write_text(fid_table_markdown(results, reference))
    Path(sample_grids.path).write_text(sample_grids_html(str(image_dir)))
    Path(mlflow_run.path).write_text(mlflow_run_markdown("evaluate"))
    return results["fid"]["student"]
