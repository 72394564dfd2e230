"""The pipeline's image reference names one build: the git commit in the tag (default) or a digest, the same
in `make image`, `make push` and the compiled pipeline; mutable tags and uncommitted image inputs are refused."""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from pipelines import compile_pipeline
from pipelines.sfddm_pipeline import REPO_ROOT
from sfddm_core.errors import SfddmError
from sfddm_runtime import image as image_lib

COMMIT_IMAGE = "ghcr.io/sfddm/sfddm:git-0123456789abcdef"
DIGEST_IMAGE = "registry.example:5000/team/sfddm@sha256:" + "ab" * 32
SFDDM = [sys.executable, "-m", "sfddm_cli"]


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.com",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A clean clone of this repository at its HEAD, with this working tree's image code and Makefile
    committed on top (so that it also works before they are committed here); returns (path, HEAD)."""
    path = tmp_path_factory.mktemp("clone") / "sfddm"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(path)], check=True)
    for name in ("Makefile", ".dockerignore", "sfddm_runtime/image.py", "components/Dockerfile"):
        (path / name).parent.mkdir(exist_ok=True)
        shutil.copyfile(REPO_ROOT / name, path / name)
    if git(path, "status", "--porcelain"):
        git(path, "add", "--all")
        git(path, "commit", "--quiet", "-m", "this working tree's image code")
    return path, git(path, "rev-parse", "HEAD")


def images_in(package):
    pipeline_spec, platform_spec = yaml.safe_load_all(package.read_text())
    images = {name: executor["container"]["image"]
              for name, executor in pipeline_spec["deploymentSpec"]["executors"].items()}
    pull = {name: config.get("imagePullPolicy")
            for name, config in platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items()}
    steps = {c["executorLabel"] for c in pipeline_spec["components"].values() if "executorLabel" in c}
    assert set(pull) == set(images) == steps and len(steps) >= 9          # every container step
    assert set(pull.values()) == {"IfNotPresent"}
    return set(images.values())


@pytest.mark.integration      # `sfddm pipeline compile` in a subprocess
def test_every_executor_runs_the_image_given_at_compile_time(tmp_path):
    package = tmp_path / "cli.yaml"
    subprocess.run([*SFDDM, "pipeline", "compile", "--out", str(package), "--image", COMMIT_IMAGE],
                   cwd=REPO_ROOT, check=True, capture_output=True)
    assert images_in(package) == {COMMIT_IMAGE}
    assert images_in(compile_pipeline(tmp_path / "digest.yaml", image=DIGEST_IMAGE)) == {DIGEST_IMAGE}
    assert image_lib.IMAGE not in package.read_text()       # the import-time placeholder never leaks out


def test_default_reference_is_the_registry_and_the_current_commit(clone, monkeypatch, tmp_path):
    path, head = clone
    expected = f"ghcr.io/sfddm/sfddm:git-{head[:12]}"
    assert image_lib.resolve(repo=path) == expected
    assert image_lib.resolve(registry="localhost:5000/me/", repo=path) == f"localhost:5000/me/sfddm:git-{head[:12]}"
    # this checkout's HEAD is what the default tag is made of here
    assert image_lib.commit() == git(REPO_ROOT, "rev-parse", "HEAD")
    # compile_pipeline's default, run against the clean clone
    monkeypatch.setattr(image_lib, "REPO_ROOT", path)
    assert images_in(compile_pipeline(tmp_path / "default.yaml")) == {expected}


def test_default_is_refused_while_image_inputs_are_uncommitted(clone, tmp_path):
    path, head = clone
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "--quiet", str(path), str(work)], check=True)
    # Files the image does not contain may change: data, params, the compiled pipeline.
    (work / "params.yaml").write_text("seed: 1\n")
    (work / "pipelines" / "sfddm_pipeline.yaml").write_text("recompiled\n")
    (work / "notes.txt").write_text("untracked, outside the image\n")
    assert image_lib.resolve(repo=work) == f"ghcr.io/sfddm/sfddm:git-{head[:12]}"
    # A changed, new or deleted file that goes into the image is refused, naming it.
    for change, name in ((lambda: (work / "sfddm_core" / "distill.py").write_text("# edited\n"),
                          "sfddm_core/distill.py"),
                         (lambda: (work / "components" / "new_step.py").write_text(""), "components/new_step.py"),
                         (lambda: (work / "requirements.lock").unlink(), "requirements.lock")):
        change()
        with pytest.raises(SfddmError, match=f"uncommitted changes to files that go into the image .*{name}"):
            image_lib.resolve(repo=work)
    # An explicit reference is the way out, and it is still checked.
    assert image_lib.resolve(COMMIT_IMAGE, repo=work) == COMMIT_IMAGE
    with pytest.raises(SfddmError, match="mutable"):
        image_lib.resolve("ghcr.io/sfddm/sfddm:dev", repo=work)


@pytest.mark.parametrize("reference, problem", [
    ("ghcr.io/sfddm/sfddm:0.1.0", "tag '0.1.0' is mutable"),
    ("ghcr.io/sfddm/sfddm:latest", "tag 'latest' is mutable"),
    ("ghcr.io/sfddm/sfddm", "has no tag"),
    ("localhost:5000/sfddm", "has no tag"),
    ("ghcr.io/sfddm/sfddm:git-0123abc", "tag 'git-0123abc' is mutable"),           # too short to be unique
    ("ghcr.io/sfddm/sfddm:git-0123456789ab-dirty", "is mutable"),
    ("ghcr.io/sfddm/sfddm@sha256:0123", "is not sha256:<64 hex digits>"),
    ("GHCR.io/Sfddm/SFDDM:git-0123456789ab", "not an image reference"),
])
def test_a_reference_that_can_name_another_build_is_refused(reference, problem):
    with pytest.raises(SfddmError) as error:
        image_lib.check(reference)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and repr(reference) in message and problem in message
    assert "expected REGISTRY/sfddm:git-<" in message


@pytest.mark.parametrize("reference", [
    COMMIT_IMAGE, DIGEST_IMAGE, "localhost:5000/sfddm:git-" + "f" * 40,
    "ghcr.io/sfddm/sfddm:git-0123456789ab@sha256:" + "0" * 64, "sfddm:git-0123456789ab"])
def test_commit_tags_and_digests_are_accepted(reference):
    assert image_lib.check(reference) == reference


@pytest.mark.integration      # `sfddm pipeline compile` in a subprocess
def test_cli_refuses_a_mutable_tag_with_one_line(tmp_path):
    done = subprocess.run([*SFDDM, "pipeline", "compile", "--out", str(tmp_path / "x.yaml"),
                           "--image", "ghcr.io/sfddm/sfddm:0.1.0"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and not (tmp_path / "x.yaml").exists()
    [line] = done.stderr.splitlines()
    assert "'ghcr.io/sfddm/sfddm:0.1.0'" in line and "mutable" in line and "expected" in line


def make_dry_run(cwd, *args):
    # Outside any enclosing make (CI runs the tests under `make test`): no inherited flags or
    # "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    return subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


def test_make_image_push_and_pipeline_use_one_reference():
    done = make_dry_run(REPO_ROOT, "image", "push", "pipeline", f"IMAGE={COMMIT_IMAGE}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"docker build -f components/Dockerfile -t {COMMIT_IMAGE} ." in lines
    assert f"docker push {COMMIT_IMAGE}" in lines
    assert f".venv/bin/sfddm pipeline compile --image {COMMIT_IMAGE}" in lines


def test_make_defaults_to_the_registry_and_the_commit(clone):
    path, head = clone
    done = make_dry_run(path, "image", "push", "pipeline")
    assert done.returncode == 0, done.stderr
    default = f"ghcr.io/sfddm/sfddm:git-{head[:12]}"
    assert f"docker build -f components/Dockerfile -t {default} ." in done.stdout.splitlines()
    assert f"docker push {default}" in done.stdout.splitlines()
    assert f".venv/bin/sfddm pipeline compile --image {default}" in done.stdout.splitlines()
    assert f"REGISTRY ?= {image_lib.DEFAULT_REGISTRY}\n" in (REPO_ROOT / "Makefile").read_text()
    done = make_dry_run(path, "push", "REGISTRY=localhost:5000/me")
    assert done.stdout.splitlines() == [f"docker push localhost:5000/me/sfddm:git-{head[:12]}"]


@pytest.mark.parametrize("target, image, problem", [
    ("image", "ghcr.io/sfddm/sfddm:0.1.0", "tag '0.1.0' is mutable"),
    ("push", "ghcr.io/sfddm/sfddm:latest", "tag 'latest' is mutable"),
    ("push", DIGEST_IMAGE, "is a digest, which only `make pipeline` takes"),
])
def test_make_refuses_what_cannot_be_built_or_pushed_as_one_build(target, image, problem):
    done = make_dry_run(REPO_ROOT, target, f"IMAGE={image}")
    assert done.returncode != 0 and "docker" not in done.stdout
    assert problem in done.stderr


def test_make_refuses_the_default_with_uncommitted_image_inputs(clone, tmp_path):
    path, _ = clone
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "--quiet", str(path), str(work)], check=True)
    (work / "sfddm_core" / "distill.py").write_text("# edited\n")
    done = make_dry_run(work, "image")
    assert done.returncode != 0 and "docker" not in done.stdout
    assert "uncommitted changes to files that go into the image (sfddm_core/distill.py)" in done.stderr
