"""The one container image every sfddm component runs in (components/Dockerfile), and its reference.

A compiled pipeline names the image of one commit, or one digest, never a moving tag:

- `REGISTRY/sfddm:git-<the first 12 hex digits of the commit>`, the default, derived from the registry
  repository (`ghcr.io/sfddm`, Makefile's REGISTRY) and `git rev-parse HEAD`: what `make image` builds
  and `make push` pushes, and what `make pipeline` / `sfddm pipeline compile` write into the package;
- or an explicit `--image` / `IMAGE=`: commit-tagged as above, or pinned by digest (`NAME@sha256:<64 hex>`).

A mutable tag (`:0.1.0`, `:latest`, no tag) is refused: the tasks pull with IfNotPresent, so a node
keeps whatever it first pulled under that tag, and KFP's cache key holds the image *reference* (not the
content), so a run could reuse results computed by another build.

The default is refused while files that go into the image (IMAGE_INPUTS) have uncommitted changes
(untracked files in those folders included): HEAD's tag would then name an image built from other code.
Marking the tag `-dirty` instead would not help: two different uncommitted states would share one tag,
a mutable tag again. Commit first, or give an explicit reference (e.g. the digest `docker push`
printed for a test build) and own that choice.

Standard library only, so that the Makefile can run it with any python3 before the venv exists:

    python3 sfddm_runtime/image.py [--registry ghcr.io/sfddm] [--image REF]

prints the reference, or one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional, Union

try:
    from sfddm_core.errors import SfddmError as _Error    # the CLI prints these as one line, exit 2
except ImportError:                                      # run as a script by a python3 without sfddm
    _Error = Exception

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REGISTRY = "ghcr.io/sfddm"      # Makefile: REGISTRY ?= ghcr.io/sfddm (a test checks they agree)
IMAGE_NAME = "sfddm"
COMMIT_TAG_PREFIX = "git-"
COMMIT_DIGITS = 12
# What the build reads (components/Dockerfile's COPY sources and the context filter), as git pathspecs;
# tests/test_docker_context.py checks them against the files the Dockerfile copies. Not the compiled
# pipelines/*.yaml: the image leaves it out, so recompiling the pipeline does not make the tree dirty for the image.
IMAGE_INPUTS = (".dockerignore", "components/Dockerfile", "requirements.lock", "pyproject.toml",
                "README.md", "sfddm_core", "sfddm_runtime", "sfddm_cli", "components", "pipelines/*.py",
                "benchmarks/*.py")
# The image of the components as defined at import time. Only a compiled pipeline needs a real image,
# and compile_pipeline/submit always set one (set_container_image); kfp.local ignores it.
IMAGE = f"{IMAGE_NAME}:unset-give-an-image-when-compiling"

EXPECTED = (f"expected REGISTRY/{IMAGE_NAME}:{COMMIT_TAG_PREFIX}<{COMMIT_DIGITS}-40 hex digits of a commit> "
            f"or NAME@sha256:<64 hex digits>")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]+)?/)"
NAME = re.compile(rf"{_HOST}?{_COMPONENT}(?:/{_COMPONENT})*")
TAG = re.compile(r"[\w][\w.-]{0,127}")
COMMIT_TAG = re.compile(rf"{COMMIT_TAG_PREFIX}[0-9a-f]{{{COMMIT_DIGITS},40}}")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

PathLike = Union[str, Path]


class ImageError(_Error):
    """An image reference or registry that cannot name one build of the image; a one-line message."""


def check(reference: str) -> str:
    """reference itself if it names one build (commit tag or digest); else ImageError naming it."""
    name, tag, digest = _split(reference)
    if not NAME.fullmatch(name) or (tag is not None and not TAG.fullmatch(tag)):
        raise ImageError(f"image {reference!r}: not an image reference; {EXPECTED}")
    if digest is not None:
        if not DIGEST.fullmatch(digest):
            raise ImageError(f"image {reference!r}: digest {digest!r} is not sha256:<64 hex digits>; {EXPECTED}")
        return reference
    if tag is None:
        raise ImageError(f"image {reference!r} has no tag (docker reads it as the mutable :latest); {EXPECTED}")
    if not COMMIT_TAG.fullmatch(tag):
        raise ImageError(f"image {reference!r}: tag {tag!r} is mutable (it can name another build later); "
                         f"{EXPECTED}")
    return reference


def commit(repo: Optional[PathLike] = None) -> str:
    """The full hex commit id of HEAD in repo (default: this checkout)."""
    return _git(repo, "rev-parse", "--verify", "HEAD^{commit}").strip()


def uncommitted_inputs(repo: Optional[PathLike] = None) -> list[str]:
    """Files that go into the image and differ from HEAD: modified, staged, deleted or untracked."""
    status = _git(repo, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--", *IMAGE_INPUTS)
    entries = status.split("\0")
    paths, index = [], 0
    while index < len(entries):
        entry = entries[index]
        if entry:
            paths.append(entry[3:])
            if entry[0] in "RC":        # a rename or copy is followed by its source path
                index += 1
        index += 1
    return sorted(paths)


def default_reference(registry: str = DEFAULT_REGISTRY, repo: Optional[PathLike] = None) -> str:
    """REGISTRY/sfddm:git-<12 hex of HEAD>, refused while files that go into the image are uncommitted."""
    registry = registry.rstrip("/")
    if not NAME.fullmatch(registry):
        raise ImageError(f"registry {registry!r}: expected a registry repository such as {DEFAULT_REGISTRY}")
    changed = uncommitted_inputs(repo)
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise ImageError(f"uncommitted changes to files that go into the image ({shown}): commit them, or "
                         "give an explicit image (--image / IMAGE=) that names one build")
    return f"{registry}/{IMAGE_NAME}:{COMMIT_TAG_PREFIX}{commit(repo)[:COMMIT_DIGITS]}"


def resolve(image: Optional[str] = None, registry: Optional[str] = None, repo: Optional[PathLike] = None) -> str:
    """The image reference to compile with: image, checked, if given; else the default from git."""
    if image:
        return check(image)
    return check(default_reference(registry or DEFAULT_REGISTRY, repo))


def _split(reference: str) -> tuple[str, Optional[str], Optional[str]]:
    """(name, tag or None, digest or None) of NAME[:TAG][@DIGEST]; a ':' before the last '/' is a port."""
    rest, _, digest = reference.partition("@")
    name, tag = rest, None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        name, tag = rest[:colon], rest[colon + 1:]
    return name, tag, (digest if "@" in reference else None)


def _git(repo: Optional[PathLike], *args: str) -> str:
    repo = repo or REPO_ROOT
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    except OSError as err:
        raise ImageError(f"cannot run git ({err.strerror}) to derive the image tag; give an explicit image "
                         "(--image / IMAGE=)") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["git failed"])[-1]
        raise ImageError(f"{repo}: cannot read the git commit ({reason}); give an explicit image "
                         "(--image / IMAGE=)")
    return done.stdout


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Print the sfddm image reference to build, push and compile with.")
    parser.add_argument("--registry", default=DEFAULT_REGISTRY, help=f"registry repository (default {DEFAULT_REGISTRY})")
    parser.add_argument("--image", default=None, help="an explicit reference: commit-tagged or a digest")
    args = parser.parse_args(argv)
    try:
        print(resolve(args.image, args.registry))
    except ImageError as err:
        print(f"sfddm image: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
