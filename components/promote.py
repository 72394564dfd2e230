from kfp import dsl
from kfp.dsl import Artifact, Markdown, Output

from sfddm_runtime.image import IMAGE

from .mlflow_link import mlflow_run_markdown


@dsl.component(base_image=IMAGE, install_kfp_package=False, additional_funcs=[mlflow_run_markdown])
def promote(config: str, model_version: int, decision: Output[Artifact], mlflow_run: Output[Markdown]):
    """sfddm promote: move the `champion` alias to this run's version if its stored FID is at most
    registry.max_fid and lower than the champion's. A refusal is not a failure: `decision` says why."""
    import json
    from pathlib import Path

    from sfddm_core import config as config_lib, stages

    outcome = stages.promote(config_lib.from_dict(json.loads(config)), model_version, decision=Path(decision.path))
    decision.metadata.update({"promoted": outcome.promoted, "reason": outcome.reason,
                              "champion_version": outcome.champion_version})
    Path(mlflow_run.path).write_text(mlflow_run_markdown("promote"))
