"""The layers import downwards only: sfddm_core <- sfddm_runtime <- components <- pipelines (sfddm_cli on top).

The library stands alone: sfddm_core imports neither kfp, dvc or Kubernetes nor the code that drives it
(the CLI, the pipeline, the components), directly or through another module, lazily or not. What a step
runs besides the library (sfddm_runtime) imports no kfp and nothing above it, and no component imports
the pipeline that uses it."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "sfddm_core"
RUNTIME = ROOT / "sfddm_runtime"
COMPONENTS = ROOT / "components"
DRIVERS = {"kfp", "kfp_server_api", "kubernetes", "dvc", "sfddm_cli", "pipelines", "components", "benchmarks"}
# Above sfddm_runtime; kubernetes is allowed (the launcher talks to the cluster), kfp is not: a running step
# cannot import kfp's compiler (sfddm_runtime/settings.py).
ABOVE_RUNTIME = {"kfp", "kfp_server_api", "sfddm_cli", "pipelines", "components"}


def imported_packages(path: Path) -> set[str]:
    """The top-level names of every absolute import in a file, those inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_no_library_module_imports_a_driver():
    offenders = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & DRIVERS)
                 for path in LIBRARY.rglob("*.py")}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_importing_every_library_module_loads_no_driver():
    """At run time too: no dependency of the library pulls a driver in (serving.py, which MLflow runs as a
    script, is left out: it registers its model on import)."""
    modules = sorted(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for path in LIBRARY.rglob("*.py") if path.name != "serving.py")
    code = (f"import importlib, sys\nfor name in {modules!r}: importlib.import_module(name)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(DRIVERS)!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def offenders(package: Path, forbidden: set[str]) -> dict[str, list[str]]:
    found = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & forbidden) for path in package.rglob("*.py")}
    return {name: names for name, names in found.items() if names}


def test_runtime_imports_nothing_above_it():
    assert offenders(RUNTIME, ABOVE_RUNTIME) == {}


def test_no_component_imports_the_pipeline_or_the_cli():
    """Components import what they run inside their function bodies (KFP embeds only the body), and those
    imports count: training_plan imports sfddm_core there alone."""
    assert "sfddm_core" in imported_packages(COMPONENTS / "training_plan.py")
    assert offenders(COMPONENTS, {"pipelines", "sfddm_cli"}) == {}


@pytest.mark.integration       # a fresh interpreter importing the runtime (torch, through the library's config)
def test_importing_every_runtime_module_loads_no_kfp():
    """At run time too: what a step imports to train (the launcher and what it imports) pulls in no kfp,
    components, pipelines or CLI."""
    modules = sorted(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for path in RUNTIME.rglob("*.py"))
    code = (f"import importlib, sys\nfor name in {modules!r}: importlib.import_module(name)\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(ABOVE_RUNTIME)!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
