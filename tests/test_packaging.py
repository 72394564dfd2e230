"""Everything the project's code imports is a dependency it declares in pyproject.toml."""
import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sfddm_core", "sfddm_runtime", "components", "pipelines", "benchmarks")


def imported_top_level_modules() -> set[str]:
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found - set(PACKAGES) - set(sys.stdlib_module_names)


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_a_declared_dependency():
    declared = {normalized(re.split(r"[=<>!~\[; ]", spec)[0])
                for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    distributions = packages_distributions()
    missing = {module: distributions.get(module) for module in imported_top_level_modules()
               if not declared & {normalized(d) for d in distributions.get(module, [module])}}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_declared_dependencies_are_pinned_as_in_the_lock():
    lock = {normalized(line.split("==")[0]): line.split("==")[1]
            for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line}
    for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, version = spec.split("==")
        assert lock.get(normalized(name)) == version, spec
