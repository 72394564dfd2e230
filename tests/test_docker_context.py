"""`make image` (docker build -f components/Dockerfile .) sends the build context that .dockerignore leaves.
Every COPY in the Dockerfile must find its sources in that context, the image's `pip install`s must find
what they install, and sfddm_runtime/image.py's IMAGE_INPUTS (what the commit-tag check watches) must cover
every file the image takes. The context is computed by the Docker SDK's own .dockerignore filter."""
import fnmatch
import json
import tomllib
from pathlib import Path, PurePosixPath

import pytest
from docker.utils.build import exclude_paths
from docker.utils.fnmatch import fnmatchcase

from sfddm_runtime import image as image_lib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = "components/Dockerfile"
# COPY/ADD flags that change nothing about which context files are copied where
HARMLESS_FLAGS = ("--chown", "--chmod", "--link")


def build_context(root: Path, dockerfile: str = DOCKERFILE) -> set[str]:
    """The files (not folders) of the context that `docker build -f dockerfile root` sends, relative to root:
    .dockerignore read as docker.api.build.BuildApiMixin.build reads it, filtered by the SDK's exclude_paths."""
    ignore = root / ".dockerignore"
    lines = [line.strip() for line in ignore.read_text().splitlines()] if ignore.exists() else []
    patterns = [line for line in lines if line and not line.startswith("#")]
    return {path for path in exclude_paths(str(root), patterns, dockerfile=dockerfile)
            if not (root / path).is_dir()}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, its arguments) for each instruction of a Dockerfile: comment lines dropped (also inside a
    continuation, as Docker does), lines ending in a backslash joined with the next."""
    found, pending = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (pending and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined = (pending + line).strip()
        pending = ""
        if joined:
            keyword, _, arguments = joined.partition(" ")
            found.append((keyword.upper(), arguments.strip()))
    return found


def copy_arguments(arguments: str) -> tuple[list[str], list[str]]:
    """(flags, paths) of COPY/ADD arguments, in shell form or JSON (exec) form; the last path is the destination."""
    words = arguments.split()
    flags = []
    while words and words[0].startswith("--"):
        flags.append(words.pop(0))
    rest = " ".join(words)
    paths = json.loads(rest) if rest.startswith("[") else rest.split()
    return flags, paths


def image_files(root: Path, context: set[str], dockerfile: str = DOCKERFILE):
    """Walk the Dockerfile (single stage), copying context files into a model of the image's file system.
    Returns (files: image path -> context path, pip_installs: [(workdir, arguments of `pip install`)],
    sources: [(COPY source, context files it matched)]). COPY --from (another stage or image) is skipped."""
    files, pip_installs, sources = {}, [], []
    workdir = PurePosixPath("/")
    folders = {workdir}
    for keyword, arguments in instructions((root / dockerfile).read_text()):
        assert "$" not in arguments, f"{keyword} {arguments}: variables are not modelled by this test; extend it"
        if keyword == "WORKDIR":
            workdir = workdir / arguments
            folders.add(workdir)
        elif keyword == "RUN" and "pip install" in arguments:
            pip_installs.append((workdir, arguments.split("pip install", 1)[1].split()))
        elif keyword in ("COPY", "ADD"):
            flags, paths = copy_arguments(arguments)
            if any(flag.startswith("--from") for flag in flags):
                continue
            unknown = [flag for flag in flags if not flag.startswith(HARMLESS_FLAGS)]
            assert not unknown and "<<" not in arguments, f"{keyword} {arguments}: not modelled by this test"
            *from_context, destination = paths
            globbed = any(char in source for source in from_context for char in "*?[")
            # Docker's own rule: several sources, or a wildcard, need a folder destination ending in "/"
            assert destination.endswith("/") or (len(from_context) == 1 and not globbed), arguments
            into = workdir / destination
            # a destination ending in "/", or a folder that exists ("." is the WORKDIR), receives files by name
            into_folder = destination.endswith("/") or into in folders
            for source in from_context:
                source = PurePosixPath(source).as_posix()       # "./sfddm_core/" is "sfddm_core"
                matched = {path: named_part(path, source) for path in sorted(context)}
                matched = {path: top for path, top in matched.items() if top is not None}
                sources.append((source, list(matched)))
                for path, top in matched.items():
                    if top.as_posix() == path:      # a file source: into a folder, or renamed to destination
                        target = into / top.name if into_folder else into
                    else:                           # a folder source: its contents go into destination
                        target = into / PurePosixPath(path).relative_to(top)
                    files[target] = path
                    folders.update(target.parents)
    return files, pip_installs, sources


def named_part(path: str, source: str):
    """The part of a context path that a COPY source names (Go filepath.Match globbing, "*" stops at "/"):
    the file itself, a folder above it whose contents are copied, or None."""
    candidates = [PurePosixPath(path), *PurePosixPath(path).parents]
    return next((part for part in candidates if fnmatchcase(part.as_posix(), source)), None)


@pytest.fixture(scope="module")
def context():
    return build_context(ROOT)


@pytest.fixture(scope="module")
def image(context):
    return image_files(ROOT, context)


def test_every_copy_source_is_in_the_build_context(image):
    _, _, sources = image
    assert sources and "pipelines/*.py" in [source for source, _ in sources]
    missing = [source for source, matched in sources if not matched]
    assert not missing, f"{DOCKERFILE} copies {missing}, which .dockerignore leaves out of the build context"


def test_the_images_pip_installs_find_the_lock_and_every_package(image):
    files, pip_installs, _ = image
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"requirements": [], "project": []}
    for workdir, arguments in pip_installs:
        if "-r" in arguments:
            needed["requirements"].append(workdir / arguments[arguments.index("-r") + 1])
        if "." in arguments:
            needed["project"] += [workdir / "pyproject.toml", workdir / project["project"]["readme"]]
            needed["project"] += [workdir / package.replace(".", "/") / "__init__.py"
                                  for package in project["tool"]["setuptools"]["packages"]]
    assert needed["requirements"] and needed["project"], pip_installs     # both installs are there
    missing = [str(path) for paths in needed.values() for path in paths if path not in files]
    assert not missing, f"the image's pip install would not find {missing}"
    # what the image installs is this checkout's, not something else with the same name
    assert all((ROOT / files[path]).is_file() for paths in needed.values() for path in paths)


def test_the_context_holds_no_caches_or_virtualenv(context):
    assert not [path for path in context if "__pycache__" in path or path.endswith(".pyc")]
    assert "pipelines/sfddm_pipeline.py" in context and ".venv" not in {p.split("/")[0] for p in context}


def test_image_inputs_cover_every_file_the_image_takes(image):
    """IMAGE_INPUTS are the git pathspecs whose uncommitted changes refuse the commit tag: every copied file
    must fall under one (git's default pathspec globbing crosses "/", as fnmatch does), and every entry must
    name something the build reads."""
    files, _, _ = image
    copied = set(files.values())

    def covered(path, spec):
        return path == spec or path.startswith(spec + "/") or fnmatch.fnmatchcase(path, spec)

    uncovered = sorted(path for path in copied if not any(covered(path, spec) for spec in image_lib.IMAGE_INPUTS))
    assert not uncovered, f"the image takes {uncovered}, which sfddm_runtime/image.py's IMAGE_INPUTS do not watch"
    read = copied | {".dockerignore", DOCKERFILE}
    unused = [spec for spec in image_lib.IMAGE_INPUTS if not any(covered(path, spec) for path in read)]
    assert not unused, f"IMAGE_INPUTS {unused} name nothing the image build reads"
    assert "pipelines/sfddm_pipeline.yaml" not in copied      # recompiling leaves the image's inputs clean


def test_the_image_itself_sets_no_gpu_visibility():
    """NVIDIA_VISIBLE_DEVICES is the NVIDIA device plugin's signal that a pod was given GPUs
    (sfddm_core.io.resolve_device refuses the CPU fallback when it is set), so the image must not set it:
    neither the Dockerfile nor its base (CUDA base images set NVIDIA_VISIBLE_DEVICES=all; python's do not)."""
    steps = instructions((ROOT / DOCKERFILE).read_text())
    assert [arguments.split(":")[0] for keyword, arguments in steps if keyword == "FROM"] == ["python"]
    env = [arguments for keyword, arguments in steps if keyword in ("ENV", "ARG")]
    assert env and not any(name in arguments for arguments in env
                           for name in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"))
