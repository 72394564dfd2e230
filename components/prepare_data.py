from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from sfddm_runtime.image import IMAGE

from .mlflow_link import mlflow_run_markdown


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[mlflow_run_markdown])
def prepare_data(config: str, dataset: Output[Dataset], mlflow_run: Output[Markdown]):
    """sfddm prepare: read the data source into train/test .npz files and meta.json."""
    import json
    from pathlib import Path

    from sfddm_core import config as config_lib, stages

    meta = stages.prepare(config_lib.from_dict(json.loads(config)), Path(dataset.path))
    dataset.metadata.update({"source": meta["source"], "shape": meta["shape"], "counts": meta["counts"]})
    Path(mlflow_run.path).write_text(mlflow_run_markdown("prepare"))
