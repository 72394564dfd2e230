"""dvc.yaml declares every library file a stage imports, so an edit reruns exactly the stages it affects."""
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "sfddm_core"
# The library module each stage's command calls into (sfddm_core/cli.py's dispatch). Every stage also
# runs through cli.py itself, config.py (its settings) and tracking.py (its MLflow run).
STAGE_MODULES = {"prepare": "data", "train_classifier": "fid", "train_teacher": "teacher",
                 "sample_teacher": "evaluate", "distill": "distill", "evaluate": "evaluate",
                 "register": "registry", "promote": "registry"}
EVERY_STAGE = ("config", "tracking")
# The registered model carries serving.py (MLflow loads it), so registration depends on it too.
SHIPPED = {"register": {"serving"}}


def library_imports(module: str) -> set[str]:
    """The sfddm_core modules `module` imports anywhere in its source (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse((LIBRARY / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("sfddm_core")):
            parts = (node.module or "").split(".")[node.level == 0:]
            found.update([parts[0]] if parts and parts[0] else [alias.name for alias in node.names])
    return found


def import_closure(modules) -> set[str]:
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(library_imports(module))
    return seen


def stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_the_import_scan_sees_relative_and_lazy_imports():
    assert {"config", "data", "diffusion", "models", "training"} <= library_imports("distill")
    assert "models" in library_imports("registry")          # imported inside register() only
    assert import_closure(["samplers"]) == {"samplers", "diffusion", "distributed", "models", "io", "errors", "config"}


def test_every_stage_declares_the_library_files_it_imports():
    assert set(stages()) == set(STAGE_MODULES)
    for name, stage in stages().items():
        declared = {dep for dep in stage["deps"] if dep.startswith("sfddm_core/")}
        modules = import_closure([STAGE_MODULES[name], *EVERY_STAGE]) | {"cli"} | SHIPPED.get(name, set())
        assert declared == {f"sfddm_core/{module}.py" for module in modules}, name


def test_stages_acting_on_the_registry_always_run():
    """DVC cannot see the MLflow registry: skipping these on unchanged files would leave a fresh
    registry without its version or champion."""
    assert {name for name, stage in stages().items() if stage.get("always_changed")} == {"register", "promote"}


def changed_deps(project: Path) -> dict[str, set[str]]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status", "--json"], cwd=project, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    changed = {}
    for stage, entries in json.loads(result.stdout or "{}").items():
        for entry in entries:
            if isinstance(entry, dict) and "changed deps" in entry:
                changed[stage] = set(entry["changed deps"])
    return changed


def lock_the_library_as_it_is(project: Path) -> None:
    """Record the copy's current library files in its dvc.lock (what `dvc repro` would write), so the
    test does not depend on the committed lock being fresh."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    for name, stage in stages().items():
        locked = [dep for dep in lock["stages"].get(name, {}).get("deps", []) if not dep["path"].startswith("sfddm_core/")]
        for dep in (dep for dep in stage["deps"] if dep.startswith("sfddm_core/")):
            content = (project / dep).read_bytes()
            locked.append({"path": dep, "hash": "md5", "md5": hashlib.md5(content).hexdigest(), "size": len(content)})
        lock["stages"].setdefault(name, {"cmd": stage["cmd"]})["deps"] = locked
    (project / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


@pytest.mark.parametrize("edited", ["samplers.py", "diffusion.py", "training.py"])
def test_editing_a_library_file_reruns_the_stages_that_import_it(tmp_path, edited):
    """In a copy of the project whose dvc.lock records its library files: after an edit, `dvc status` reports the
    file as a changed dependency of exactly the stages whose imports reach it."""
    project = tmp_path / "project"
    shutil.copytree(LIBRARY, project / "sfddm_core", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / ".dvc", project / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    for name in ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, project / name)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    lock_the_library_as_it_is(project)
    before = changed_deps(project)
    with open(project / "sfddm_core" / edited, "a") as handle:
        handle.write("\n# an edit\n")
    after = changed_deps(project)
    newly = {stage for stage, deps in after.items() if f"sfddm_core/{edited}" in deps}
    expected = {name for name in STAGE_MODULES
                if edited[:-3] in import_closure([STAGE_MODULES[name], *EVERY_STAGE]) | SHIPPED.get(name, set())}
    assert newly == expected and expected
    assert all(f"sfddm_core/{edited}" not in deps for deps in before.values())
