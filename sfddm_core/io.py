"""Atomic outputs, hashes and device choice: a failed stage leaves nothing half-written."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
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


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when a GPU is present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA GPU is visible; use auto or cpu")
    return torch.device(name)


def student_provenance(folder: PathLike) -> dict:
    """sfddm.json of a student folder: phi, T, spacing, teacher source and hash (and "files", the hashes).
    Here rather than in models so that reading it imports no diffusers (registration's no-op path)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise SfddmError(f"{path}: missing; expected a student folder written by sfddm distill")
    return json.loads(path.read_text())
