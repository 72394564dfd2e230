"""Where the pipeline's GPU steps run: node selector, toleration and accelerator, read at compile time;
and the check the GPU smoke test runs there (device_report).

The values are the data of the ConfigMap sfddm-gpu-profile (k8s/overlays/gpu/gpu-profile.yaml), the
cluster's one description of its GPU pool, so the pipeline and the cluster cannot drift apart. For
another cluster, point SFDDM_GPU_PROFILE at that ConfigMap's manifest or at just its data:

    kubectl -n sfddm get configmap sfddm-gpu-profile -o jsonpath='{.data}' > gpu-profile.json
    SFDDM_GPU_PROFILE=gpu-profile.json sfddm pipeline compile
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import yaml

from sfddm_core.errors import SfddmError

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "k8s" / "overlays" / "gpu" / "gpu-profile.yaml"
KEY_PREFIX = "gpu_"     # the ConfigMap's keys are the field names below with this prefix


@dataclass(frozen=True)
class GpuProfile:
    node_selector_key: str
    node_selector_value: str
    toleration_key: str
    toleration_operator: str
    toleration_effect: str
    accelerator_type: str
    accelerator_limit: int


def load(path: Optional[Union[str, Path]] = None) -> GpuProfile:
    """The profile in `path`, else in $SFDDM_GPU_PROFILE, else in the repository's GPU overlay."""
    path = Path(path or os.environ.get("SFDDM_GPU_PROFILE") or DEFAULT_PATH)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SfddmError(f"{path}: cannot read the GPU profile ({err.strerror}); set SFDDM_GPU_PROFILE to "
                         "the sfddm-gpu-profile ConfigMap or its data") from None
    except yaml.YAMLError as err:
        raise SfddmError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    values = document.get("data") if isinstance(document, dict) and document.get("kind") == "ConfigMap" \
        else document
    keys = [KEY_PREFIX + f.name for f in dataclasses.fields(GpuProfile)]
    missing = [key for key in keys if not isinstance(values, dict) or values.get(key) in (None, "")]
    if missing:
        raise SfddmError(f"{path}: GPU profile lacks {', '.join(missing)}; expected the keys of ConfigMap "
                         "sfddm-gpu-profile")
    values = {f.name: str(values[KEY_PREFIX + f.name]) for f in dataclasses.fields(GpuProfile)}
    if not values["accelerator_limit"].isdigit() or int(values["accelerator_limit"]) < 1:
        raise SfddmError(f"{path}: gpu_accelerator_limit: expected a positive integer, got "
                         f"{values['accelerator_limit']!r}")
    return GpuProfile(**{**values, "accelerator_limit": int(values["accelerator_limit"])})


def device_report(device: torch.device) -> str:
    """One line on `device`, after a matrix product on it has come out right: that the device computes,
    not only that it is listed (a GPU whose driver cannot run this torch's kernels fails here)."""
    ones = torch.ones(256, 256, device=device)
    product = float((ones @ ones).sum())
    if product != 256.0 ** 3:
        raise SfddmError(f"device {device}: a product of 256 x 256 ones summed to {product}, expected {256.0 ** 3}")
    if device.type != "cuda":
        return f"{device}: torch {torch.__version__}, a 256 x 256 matrix product checked"
    gpu = torch.cuda.get_device_properties(device)
    return (f"{device}: {gpu.name}, {gpu.total_memory / 2 ** 30:.0f} GiB, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), a 256 x 256 matrix product checked")
