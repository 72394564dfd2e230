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
CLI = "sfddm_cli/cli.py"
CODE = ("sfddm_core/", "sfddm_cli/")       # the project's code among a stage's deps
# The library module each stage's function in sfddm_core/stages.py calls into. Every stage also runs
# through the CLI and stages.py, whose module-level imports it needs (config, tracking, ...); they
# import each stage's module inside its function, so a stage does not depend on the others' modules.
STAGE_MODULES = {"prepare": "data", "train_classifier": "fid", "train_teacher": "teacher",
                 "sample_teacher": "evaluate", "distill": "distill", "evaluate": "evaluate",
                 "register": "registry", "promote": "registry"}
DISPATCH = ("stages", "config")     # config: the CLI loads the settings (sfddm_cli imports no other library module)
# The registered model carries serving.py (MLflow loads it), so registration depends on it too.
SHIPPED = {"register": {"serving"}}
# evaluate samples the student by its method's sampler, which stages.evaluate looks up in the method table.
METHOD_TABLE = {"evaluate": ("methods",)}


def module_file(module: str) -> Path:
    """sfddm_core's file of a dotted module name relative to the package ("methods.sfddm")."""
    path = LIBRARY.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def library_imports(module: str, lazy: bool = True) -> set[str]:
    """The sfddm_core modules `module` imports (lazy imports inside functions too, unless lazy=False),
    as dotted names relative to sfddm_core."""
    package = module.split(".") if module_file(module).name == "__init__.py" else module.split(".")[:-1]
    tree = ast.parse(module_file(module).read_text())
    found = set()
    for node in ast.walk(tree) if lazy else tree.body:
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[:len(package) - node.level + 1]
        elif (node.module or "").split(".")[0] == "sfddm_core":
            base = []
            node = ast.ImportFrom(module=node.module.partition(".")[2] or None, names=node.names, level=1)
        else:
            continue
        parts = base + (node.module.split(".") if node.module else [])
        candidates = [".".join(parts)] if node.module else [".".join(parts + [alias.name]) for alias in node.names]
        found.update(name for name in candidates if name and module_file(name).exists())
    return found


def import_closure(modules, lazy: bool = True) -> set[str]:
    seen, todo = set(), list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(library_imports(module, lazy))
    return seen


def stage_modules(name: str) -> set[str]:
    """Every library module stage `name` imports: its own module's closure, and the dispatch's module-level one."""
    return (import_closure([STAGE_MODULES[name], *METHOD_TABLE.get(name, ())]) | import_closure(DISPATCH, lazy=False)
            | SHIPPED.get(name, set()))


def declared_path(module: str) -> str:
    return str(module_file(module).relative_to(ROOT))


def stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_the_import_scan_sees_relative_lazy_and_package_imports():
    assert {"config", "data", "diffusion", "models", "training", "methods"} <= library_imports("distill")
    assert "models" in library_imports("registry")          # imported inside register() only
    assert {"methods.sfddm", "methods.progressive", "methods.base"} <= library_imports("methods")
    assert {"diffusion", "students", "methods.base"} <= library_imports("methods.sfddm")
    assert "teacher" in library_imports("stages") and "teacher" not in library_imports("stages", lazy=False)


def test_every_stage_declares_the_library_files_it_imports():
    assert set(stages()) == set(STAGE_MODULES)
    for name, stage in stages().items():
        declared = {dep for dep in stage["deps"] if dep.startswith(CODE)}
        assert declared == {CLI} | {declared_path(module) for module in stage_modules(name)}, name


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
        locked = [dep for dep in lock["stages"].get(name, {}).get("deps", []) if not dep["path"].startswith(CODE)]
        for dep in (dep for dep in stage["deps"] if dep.startswith(CODE)):
            content = (project / dep).read_bytes()
            locked.append({"path": dep, "hash": "md5", "md5": hashlib.md5(content).hexdigest(), "size": len(content)})
        lock["stages"].setdefault(name, {"cmd": stage["cmd"]})["deps"] = locked
    (project / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


@pytest.mark.integration      # dvc subprocesses on a copy of the project
@pytest.mark.parametrize("edited", ["samplers.py", "diffusion.py", "training.py", "methods/sfddm.py"])
def test_editing_a_library_file_reruns_the_stages_that_import_it(tmp_path, edited):
    """In a copy of the project whose dvc.lock records its library files: after an edit, `dvc status` reports the
    file as a changed dependency of exactly the stages whose imports reach it."""
    project = tmp_path / "project"
    for package in CODE:
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
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
    expected = {name for name in STAGE_MODULES if edited[:-3].replace("/", ".") in stage_modules(name)}
    assert newly == expected and expected
    assert all(f"sfddm_core/{edited}" not in deps for deps in before.values())


def test_the_library_imports_no_module_that_imports_it_back():
    """No import circle (lazy imports included): settings are a leaf, the methods sit above them, so a
    stage's dvc.yaml deps hold only what it runs (editing a method reruns distill and what follows)."""
    modules = {".".join(path.relative_to(LIBRARY).with_suffix("").parts).removesuffix(".__init__")
               for path in LIBRARY.rglob("*.py") if path.name != "__init__.py" or path.parent != LIBRARY}
    for module in modules:
        assert module not in import_closure(library_imports(module)), f"{module} imports itself back"
    assert stage_modules("prepare") == {"stages", "config", "data", "diffusion", "distributed", "errors", "io",
                                        "tracking"}
    assert {name for name in STAGE_MODULES if "methods.sfddm" in stage_modules(name)} == {"distill", "evaluate"}
