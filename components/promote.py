from kfp import dsl
from kfp.dsl import Artifact, Output

from .image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(model_name: str, model_version: int, max_fid: float, decision: Output[Artifact]):
    """sfddm promote: move the `champion` alias to this run's version if its stored FID is at most
    max_fid and lower than the champion's. A refusal is not a failure: `decision` says why."""
    from pathlib import Path

    from sfddm_core import registry, tracking

    with tracking.stage_run("promote"):
        outcome = registry.promote_gate(model_name, max_fid, Path(decision.path), version=model_version)
        tracking.log_artifacts(decision.path, "promotion")
    decision.metadata.update({"promoted": outcome.promoted, "reason": outcome.reason,
                              "champion_version": outcome.champion_version})
