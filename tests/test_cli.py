"""The CLI's settings: params.yaml spells out the defaults. Bad input is catalogued in test_bad_inputs.py."""
from sfddm_core import config


def test_defaults_are_valid_and_params_yaml_matches_them():
    """params.yaml spells out every default: loading it equals the dataclass defaults."""
    assert config.load("params.yaml") == config.Config()
