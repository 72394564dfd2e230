"""Job sfddm-mlflow-users: the pipeline runner's account on the MLflow server (basic-auth app).

With the admin's credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, Secret
sfddm-mlflow-admin) it calls the auth app's REST API to
  1. create the runner's user (RUNNER_USERNAME / RUNNER_PASSWORD, Secret sfddm-mlflow-runner), or
     set its password to the Secret's if the user exists;
  2. create the experiment SFDDM_EXPERIMENT and the registered model SFDDM_REGISTERED_MODEL where
     they are missing, as the admin, so that no other user can take them first;
  3. grant the runner EDIT on the experiment (runs, metrics, artifacts, logged models) and MANAGE on
     the registered model (new versions, their tags, the challenger and champion aliases);
  4. create the read-only user of k8s/serving (READER_USERNAME / READER_PASSWORD, Secret
     sfddm-mlflow-reader), or set its password, with no grants: it reads, as everyone does.
Everyone else gets the server's default_permission (READ) or, without credentials, 401.
Idempotent: each step checks first, so it runs again after every `kubectl apply -k`.
"""
import os
import sys
import time

import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client

WAIT_S = 600
EXPERIMENT_PERMISSION = "EDIT"
MODEL_PERMISSION = "MANAGE"


def wait_for(uri: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            if requests.get(f"{uri}/health", timeout=5).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"MLflow at {uri} did not answer /health within {WAIT_S} s")
        print(f"waiting for MLflow at {uri}", flush=True)
        time.sleep(5)


def ensure_user(auth, username: str, password: str) -> None:
    try:
        auth.get_user(username)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        auth.create_user(username, password)
        print(f"user {username} created")
        return
    auth.update_user_password(username, password)
    print(f"user {username} exists; password set from the Secret")


def ensure_permission(auth, username: str, resource_type: str, resource_id: str, permission: str) -> None:
    if auth.get_user_permission(username, resource_type, resource_id).permission == permission:
        print(f"{username} has {permission} on {resource_type} {resource_id}")
        return
    try:
        auth.grant_user_permission(username, resource_type, resource_id, permission)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        # A grant of another level: replace it.
        auth.revoke_user_permission(username, resource_type, resource_id)
        auth.grant_user_permission(username, resource_type, resource_id, permission)
    print(f"{username} granted {permission} on {resource_type} {resource_id}")


def main() -> None:
    uri = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    runner, password = os.environ["RUNNER_USERNAME"], os.environ["RUNNER_PASSWORD"]
    experiment_name = os.environ["SFDDM_EXPERIMENT"]
    model_name = os.environ["SFDDM_REGISTERED_MODEL"]
    wait_for(uri)
    auth = get_app_client("basic-auth", tracking_uri=uri)
    client = MlflowClient(uri)

    ensure_user(auth, runner, password)

    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    ensure_permission(auth, runner, "experiment", experiment_id, EXPERIMENT_PERMISSION)

    try:
        client.get_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(model_name)
        print(f"registered model {model_name} created")
    ensure_permission(auth, runner, "registered_model", model_name, MODEL_PERMISSION)

    ensure_user(auth, os.environ["READER_USERNAME"], os.environ["READER_PASSWORD"])


if __name__ == "__main__":
    main()
