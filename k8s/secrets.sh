#!/bin/sh
# Creates the Secrets that the manifests in k8s/ and the pipeline's tasks use, with random
# values, where they do not exist yet. An existing Secret is never changed, so this is safe
# to run again at any time; `kubectl apply -k` never touches Secrets (there are none in k8s/).
#
#   k8s/secrets.sh [RUN_NAMESPACE]
#
# RUN_NAMESPACE is where Kubeflow Pipelines runs execute (default kubeflow; a profile
# namespace in a multi-user Kubeflow). Both namespaces must exist: apply k8s/ first.
#
#   namespace sfddm:          sfddm-postgres, sfddm-mlflow-admin, sfddm-mlflow-runner, and one S3 key,
#                             sfddm-mlflow-reader
#                             per client of the object store: sfddm-s3-admin (the bucket Job),
#                             sfddm-mlflow-s3 (the MLflow server), sfddm-dvc-s3 (DVC users),
#                             sfddm-pipeline-s3 (pipeline tasks, read-only)
#   namespace RUN_NAMESPACE:  sfddm-pipeline-s3, sfddm-mlflow-runner (copies of those in sfddm)
#
# Values are hex, safe in the database URI and the object store's JSON identity file.
set -eu

NS=sfddm
RUN_NS=${1:-kubeflow}
KUBECTL=${KUBECTL:-kubectl}

# N random bytes as 2N hex digits
random() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

# secret NAMESPACE NAME KEY=VALUE...: create it unless it exists
secret() {
  ns=$1 name=$2
  shift 2
  if "$KUBECTL" -n "$ns" get secret "$name" >/dev/null 2>&1; then
    echo "secret $name in $ns exists: kept"
    # base64 of CHANGE_ME: a template applied by an older k8s/base
    if "$KUBECTL" -n "$ns" get secret "$name" -o 'jsonpath={.data}' | grep -q Q0hBTkdFX01F; then
      echo "WARNING: secret $name in $ns still holds CHANGE_ME: set real values (k8s/README.md, \"Secrets\")" >&2
    fi
    return 0
  fi
  for pair; do set -- "$@" "--from-literal=$pair"; shift; done
  "$KUBECTL" -n "$ns" create secret generic "$name" "$@"
}

# value NAME KEY: the value of KEY in Secret NAME of namespace sfddm
value() { "$KUBECTL" -n "$NS" get secret "$1" -o "jsonpath={.data.$2}" | base64 -d; }

for ns in "$NS" "$RUN_NS"; do
  "$KUBECTL" get namespace "$ns" >/dev/null 2>&1 || {
    echo "namespace $ns does not exist: apply k8s/ first (k8s/README.md)" >&2
    exit 1
  }
done

# PostgreSQL and SeaweedFS take these when they first initialise, the MLflow admin user
# when the server first starts: rotating them later takes more than a new Secret (k8s/README.md).
secret "$NS" sfddm-postgres POSTGRES_PASSWORD="$(random 24)"
# SeaweedFS's identities (k8s/base/object-store.yaml), each allowed on its own buckets only.
for name in sfddm-s3-admin sfddm-mlflow-s3 sfddm-dvc-s3 sfddm-pipeline-s3; do
  secret "$NS" "$name" AWS_ACCESS_KEY_ID="$(random 10)" AWS_SECRET_ACCESS_KEY="$(random 24)"
done
secret "$NS" sfddm-mlflow-admin MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD="$(random 24)" \
  MLFLOW_FLASK_SERVER_SECRET_KEY="$(random 32)"
# Job/sfddm-mlflow-users sets the runner's MLflow password to this one.
secret "$NS" sfddm-mlflow-runner MLFLOW_TRACKING_USERNAME=sfddm-pipeline-runner \
  MLFLOW_TRACKING_PASSWORD="$(random 24)"
# The read-only MLflow user of k8s/serving (the server's default READ permission); Job/sfddm-mlflow-users
# creates it with this password.
secret "$NS" sfddm-mlflow-reader MLFLOW_TRACKING_USERNAME=sfddm-serving \
  MLFLOW_TRACKING_PASSWORD="$(random 24)"

if [ "$RUN_NS" != "$NS" ]; then
  secret "$RUN_NS" sfddm-pipeline-s3 \
    AWS_ACCESS_KEY_ID="$(value sfddm-pipeline-s3 AWS_ACCESS_KEY_ID)" \
    AWS_SECRET_ACCESS_KEY="$(value sfddm-pipeline-s3 AWS_SECRET_ACCESS_KEY)"
  secret "$RUN_NS" sfddm-mlflow-runner \
    MLFLOW_TRACKING_USERNAME="$(value sfddm-mlflow-runner MLFLOW_TRACKING_USERNAME)" \
    MLFLOW_TRACKING_PASSWORD="$(value sfddm-mlflow-runner MLFLOW_TRACKING_PASSWORD)"
  # Earlier versions copied MLflow's S3 key here for pipeline tasks, which no longer use it.
  if "$KUBECTL" -n "$RUN_NS" get secret sfddm-mlflow-s3 >/dev/null 2>&1; then
    echo "WARNING: secret sfddm-mlflow-s3 in $RUN_NS is an old copy of MLflow's S3 key that pipeline" \
      "tasks no longer use: kubectl -n $RUN_NS delete secret sfddm-mlflow-s3" >&2
  fi
fi
