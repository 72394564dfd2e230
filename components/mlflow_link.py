"""The link from a KFP step to the MLflow run of its stage, as Markdown that the KFP UI renders.

The function is embedded into every component whose stage opens an MLflow run (`additional_funcs`), so
it imports what it uses inside its body, like a component does. SFDDM_MLFLOW_UI_URL
(sfddm_runtime/settings.py MLFLOW_UI_ENV, an optional key of the settings ConfigMap) is the MLflow UI's address
as a browser reaches it (an ingress, a port-forward), where the steps' tracking URI is a Service name that
only the cluster resolves.
"""


def mlflow_run_markdown(stage: str) -> str:
    """A link to the newest MLflow run of `stage` in this pipeline run (tags sfddm.stage and
    sfddm.pipeline_run; the run KFP's MLflow integration opened for the task, MLFLOW_RUN_ID, where set),
    at $SFDDM_MLFLOW_UI_URL, else at MLFLOW_TRACKING_URI. Where there is no run to link to (tracking off,
    no pipeline run id, MLflow unreachable now), the reason instead: the stage itself has succeeded."""
    import os

    from sfddm_core import tracking
    from sfddm_core.errors import SfddmError

    title = f"**MLflow run of {stage}**"
    if not tracking.enabled():
        return f"{title}: none, tracking is off (SFDDM_TRACKING).\n"
    pipeline_run = os.environ.get("SFDDM_PIPELINE_RUN", "")
    run_id = os.environ.get("MLFLOW_RUN_ID", "")
    try:
        client, experiment_id = tracking.connect()
        with tracking.mlflow_errors(f"finding the {stage} run"):
            if run_id:
                experiment_id = client.get_run(run_id).info.experiment_id
            elif pipeline_run:
                found = client.search_runs(
                    [experiment_id], f"tags.`{tracking.STAGE_TAG}` = '{stage}' and "
                    f"tags.`{tracking.PIPELINE_TAG}` = '{pipeline_run}'",
                    order_by=["attributes.start_time DESC"], max_results=1)
                run_id = found[0].info.run_id if found else ""
    except SfddmError as err:
        return f"{title}: not found ({err}).\n"
    if not run_id:
        return (f"{title}: not found (no run tagged {tracking.STAGE_TAG}={stage} in pipeline run "
                f"{pipeline_run or '?'}).\n")
    base = os.environ.get("SFDDM_MLFLOW_UI_URL") or tracking.tracking_uri()
    if base.startswith(("http://", "https://")):
        url = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return f"{title}: [{run_id}]({url})\n\nExperiment {experiment_id}, {url}\n"
    return (f"{title}: run {run_id} in experiment {experiment_id} of {base} "
            f"(`mlflow ui --backend-store-uri {base}` shows it).\n")
