"""Extract a CRD's openAPIV3Schema as JSON, descriptions removed (they take no part in validation).

How the two schema files here were made, from a snapshot of github.com/kubeflow/trainer:

    for f in trainjobs trainingruntimes; do p=manifests/base/crds/trainer.kubeflow.org_$f.yaml
      git show v2.3.0:$p | python extract_crd.py "kubeflow/trainer tag v2.3.0 (commit $(git rev-parse v2.3.0^{commit})), $p, descriptions removed" \\
        > trainer.kubeflow.org_$f.schema.json
    done

tests/test_trainjob.py validates manifests against them with unknown fields as errors.
"""
import json
import sys

import yaml


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


if __name__ == "__main__":
    crd = yaml.safe_load(sys.stdin)
    [version] = crd["spec"]["versions"]
    print(json.dumps({"source": sys.argv[1], "crd": crd["metadata"]["name"], "version": version["name"],
                      "openAPIV3Schema": strip(version["schema"]["openAPIV3Schema"])},
                     sort_keys=True, separators=(",", ":")))
