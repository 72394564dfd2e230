"""One source of default settings: the dataclasses of sfddm_core/config.py. params.yaml and docs/params.md's
params reference spell them out, key by key; these tests fail when either drifts. Bad input is
catalogued in test_bad_inputs.py."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sfddm_core import config
from sfddm_core.tracking import flatten

ROOT = Path(__file__).resolve().parents[1]


DEFAULTS = flatten(config.to_dict(config.Config()))     # {dotted key: default}, lists for tuples


def test_params_yaml_spells_out_every_default_exactly():
    """Every key, with the dataclass default's value: a key missing from params.yaml fails here (loading
    it would fill in the default and hide the gap)."""
    assert flatten(yaml.safe_load((ROOT / "params.yaml").read_text())) == DEFAULTS
    assert config.load(ROOT / "params.yaml") == config.Config()


def documented_defaults() -> dict:
    """docs/params.md as {dotted key: default as written (parsed as YAML)}. A row may name
    several keys of one section (`teacher.lr`, `batch_size`, ...), their defaults comma-separated."""
    section = (ROOT / "docs" / "params.md").read_text()
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        keys = re.findall(r"`([a-z_.0-9]+)`", cells[0]) if line.startswith("| `") else []
        if not keys:
            continue
        prefix = keys[0].rpartition(".")[0]
        keys = [keys[0]] + [key if "." in key else f"{prefix}.{key}" for key in keys[1:]]
        values = [cells[1]] if len(keys) == 1 else cells[1].split(", ")
        assert len(values) == len(keys), line
        for key, value in zip(keys, values):
            assert key not in rows, f"{key} is documented twice"
            rows[key] = yaml.safe_load(value)
    return rows


def test_params_page_lists_every_key_with_its_default():
    documented = documented_defaults()
    assert set(documented) == set(DEFAULTS)
    for key, value in documented.items():
        default = DEFAULTS[key]
        if isinstance(default, float):
            value = float(value)            # YAML reads 1e-3 as text
        assert value == default, f"docs/params.md: {key} = {value!r}, the default is {default!r}"


def test_dry_run_prints_the_resolved_settings_and_runs_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sfddm_cli", "distill", "--params", str(ROOT / "params.yaml"),
                             "--set", "student.steps=10", "--out", str(tmp_path / "student"), "--dry-run"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["student"]["steps"] == 10 and flatten(resolved)["distill.lr"] == DEFAULTS["distill.lr"]
    assert list(tmp_path.iterdir()) == []


def test_the_methods_section_is_plain_data_that_config_does_not_type():
    """methods.<name> holds a method's own settings; config.py checks only that it is a mapping of mappings
    (the method types its section: tests/test_methods.py), and carries it through overrides and to_dict."""
    cfg = config.with_overrides({"methods": {"any": {"rate": "1e-4", "sizes": [1, 2]}}},
                                {"methods.any.depth": 3, "methods.other.on": True})
    assert cfg.methods == {"any": {"rate": "1e-4", "sizes": [1, 2], "depth": 3}, "other": {"on": True}}
    assert config.to_dict(cfg)["methods"] == cfg.methods and config.Config().methods == {}
    for values, message in (({"methods": ["any"]}, "methods: expected a mapping, got ['any']"),
                            ({"methods": {"any": 3}}, "methods.any: expected a mapping, got 3")):
        with pytest.raises(config.ConfigError) as err:
            config.from_dict(values)
        assert str(err.value) == message
