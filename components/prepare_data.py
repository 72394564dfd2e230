from kfp import dsl
from kfp.dsl import Dataset, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_data(config: str, dataset: Output[Dataset]):
    """sfddm prepare: read the data source into train/test .npz files and meta.json."""
    import json
    from pathlib import Path

    from sfddm_core import config as config_lib, stages

    meta = stages.prepare(config_lib.from_dict(json.loads(config)), Path(dataset.path))
    dataset.metadata.update({"source": meta["source"], "shape": meta["shape"], "counts": meta["counts"]})
