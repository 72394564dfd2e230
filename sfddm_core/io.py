"""Atomic outputs, hashes and device choice: a failed stage leaves nothing half-written."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch

from .errors import ConfigError, SfddmError

PathLike = Union[str, Path]
MANIFEST = "sfddm.json"     # in a folder sfddm wrote: its provenance and the sha256 of every other file


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file next to `path`; it is renamed onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text)


def write_json(path: PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_array(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def sha256_files(path: PathLike) -> dict[str, str]:
    """The sha256 of every file under a folder, by relative path (POSIX separators), in sorted path order."""
    root = Path(path)
    return {file.relative_to(root).as_posix(): sha256_file(file)
            for file in sorted(p for p in root.rglob("*") if p.is_file())}


def sha256_tree(path: PathLike) -> str:
    """One hash of every file under a folder (relative names and contents), for model provenance."""
    digest = hashlib.sha256()
    for name, file_digest in sha256_files(path).items():
        digest.update(name.encode() + b"\0" + file_digest.encode())
    return digest.hexdigest()


# How a container learns that it was given GPUs (a pod requesting nvidia.com/gpu, `docker run --gpus`):
# - NVIDIA_VISIBLE_DEVICES names them, as the NVIDIA device plugin's "envvar" strategy sets it (GPU UUIDs or
#   indices) or its "volume-mounts" strategy (a folder whose entries name them). The image does not set it
#   (components/Dockerfile; its python:slim base is no CUDA image), so a CPU pod has none.
# - Injected through CDI (the GPU Operator's default since v25.10: device-list strategy
#   "cdi-annotations,cdi-cri"), the GPUs' device nodes /dev/nvidia<N> are there and NVIDIA_VISIBLE_DEVICES
#   is "void" (the toolkit's CDI spec sets it, pkg/nvcdi/wrapper.go). So "void", like unset, "" and "none",
#   names no GPUs, and the device nodes are looked at as well.
GPU_GRANT = "NVIDIA_VISIBLE_DEVICES"
NO_GPUS = ("", "void", "none")
DEVICE_NODES = Path("/dev")
GPU_NODE = re.compile(r"nvidia[0-9]+")      # one per GPU; not nvidiactl, nvidia-uvm, nvidia-modeset, nvidia-caps
# The oldest Linux driver that runs each CUDA major version (NVIDIA's minor version compatibility table:
# https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html). torch's wheels bring
# their CUDA runtime (requirements.lock's nvidia-* pins); the node brings the driver.
MIN_LINUX_DRIVER = {"11": "450", "12": "525", "13": "580"}


def resolve_device(name: str) -> torch.device:
    """The device every stage trains, samples and serves on. auto: CUDA when torch can use a GPU, else the CPU,
    except in a container (or on a machine) that was given GPUs (gpus_given) which torch cannot use: that is
    refused, naming why, rather than quietly training on the CPU for hours. cuda: refused the same way without
    a usable GPU."""
    if name not in ("auto", "cuda"):
        return torch.device(name)
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.device("cuda")
    given = gpus_given()
    if name == "auto" and not given:
        return torch.device("cpu")
    unusable = f"torch cannot use a GPU ({_why_cuda_is_unusable()})"
    if name == "cuda":
        raise ConfigError(f"device: cuda was asked for but {unusable}; use device: cpu, or run where torch can "
                          "use a GPU")
    raise SfddmError(f"device: auto in a container given GPUs ({given}), but {unusable}; "
                     "refusing to fall back to the CPU (set device: cpu to train there on purpose)")


def gpus_given() -> str:
    """How this container was given GPUs ("NVIDIA_VISIBLE_DEVICES=GPU-..." or "device nodes /dev/nvidia0"),
    "" when it was given none."""
    value = os.environ.get(GPU_GRANT, "").strip()
    if value.lower() not in NO_GPUS:
        if value.startswith("/"):        # the device plugin's volume-mounts strategy
            folder = Path(value)
            value = ",".join(sorted(entry.name for entry in folder.iterdir())) if folder.is_dir() else value
        return f"{GPU_GRANT}={value}"
    nodes = sorted((path for path in DEVICE_NODES.glob("nvidia*") if GPU_NODE.fullmatch(path.name)),
                   key=lambda path: int(path.name.removeprefix("nvidia")))
    return f"device nodes {', '.join(map(str, nodes))}" if nodes else ""


def _why_cuda_is_unusable() -> str:
    """torch's own reason (its first sentence), the CUDA version torch is built for and the driver that needs,
    and CUDA_VISIBLE_DEVICES if set. The reason comes from torch.cuda.init(), which checks again on each call:
    the warning torch.cuda.is_available() emits comes once per process, and not at all when no driver is found."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    try:
        torch.cuda.init()
        reason = f"torch sees {torch.cuda.device_count()} CUDA devices"
    except (RuntimeError, AssertionError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0].rstrip(".")
        found = re.search(r"found version (\d+)", reason)
        if found:       # cudaDriverGetVersion's number: the newest CUDA the driver runs, 1000 * major + 10 * minor
            version = int(found.group(1))
            reason += f": the node's driver runs CUDA {version // 1000}.{version % 1000 // 10} at most"
    parts = [reason, f"torch {torch.__version__} is built for CUDA {torch.version.cuda}"]
    driver = MIN_LINUX_DRIVER.get(torch.version.cuda.split(".")[0])
    if driver:
        parts[-1] += f", which needs NVIDIA driver >= {driver}"
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        parts.append(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} limits what it sees")
    return "; ".join(parts)


def student_provenance(folder: PathLike) -> dict:
    """sfddm.json of a student folder: phi, T, spacing, teacher source and hash (and "files", the hashes).
    Here rather than in models so that reading it imports no diffusers (registration's no-op path)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise SfddmError(f"{path}: missing; expected a student folder written by sfddm distill")
    return json.loads(path.read_text())
