"""Bad input at the edge: one line naming the key or file, exit status 2, nothing half-written."""
import numpy as np
import pytest
import yaml
from PIL import Image

from sfddm_core import cli, config
from sfddm_core.errors import ConfigError


def run_cli(tmp_path, capsys, params: dict, *argv):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code = cli.main([argv[0], "--params", str(tmp_path / "params.yaml"), *argv[1:]])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("params, key", [
    ({"student": {"steps": 0}}, "student.steps"),
    ({"student": {"steps": 1001}}, "student.steps"),
    ({"student": {"steps": 2.5}}, "student.steps"),
    ({"student": {"steps": 3, "spacing": [10, 5, 20]}}, "student.spacing"),
    ({"student": {"steps": 3, "spacing": [0, 5, 1000]}}, "student.spacing"),
    ({"student": {"steps": 3, "spacing": [0, 5, 5]}}, "student.spacing"),
    ({"student": {"steps": 128, "spacing": "leading"}}, "student.spacing"),
    ({"student": {"spacing": "middle"}}, "student.spacing"),
    ({"studnet": {"steps": 4}}, "studnet"),
    ({"distill": {"substep": 4}}, "distill.substep"),
    ({"distill": {"loss": "huber"}}, "distill.loss"),
    ({"distill": {"batch_size": 0}}, "distill.batch_size"),
    ({"teacher": {"beta_schedule": "cosine"}}, "teacher.beta_schedule"),
    ({"data": {"image_size": 7}}, "data.image_size"),
    ({"data": {"source": "folder"}}, "data.path"),
    ({"data": {"source": "mnist"}}, "data.source"),
    ({"device": "tpu"}, "device"),
    ({"teacher": {"source": "pretrained"}}, "teacher.uri"),
])
def test_bad_params_give_one_line_naming_the_key(tmp_path, capsys, params, key):
    code, err = run_cli(tmp_path, capsys, params, "prepare", "--out", str(tmp_path / "out"))
    assert code == 2
    assert len(err.splitlines()) == 1 and key in err, err
    assert not (tmp_path / "out").exists()


def test_did_you_mean_for_misspelled_keys():
    with pytest.raises(ConfigError, match=r"did you mean distill.substeps"):
        config.from_dict({"distill": {"substep": 4}})


def test_set_overrides_are_validated(tmp_path, capsys):
    code = cli.main(["prepare", "--params", str(tmp_path / "none.yaml"), "--set", "student.steps=-3",
                     "--out", str(tmp_path / "out")])
    assert code == 2 and "student.steps" in capsys.readouterr().err


def test_defaults_are_valid_and_params_yaml_matches_them():
    """params.yaml spells out every default: loading it equals the dataclass defaults."""
    assert config.load("params.yaml") == config.Config()


def test_missing_data_folder(tmp_path, capsys):
    params = {"data": {"source": "folder", "path": str(tmp_path / "nowhere"), "channels": 1}}
    code, err = run_cli(tmp_path, capsys, params, "prepare", "--out", str(tmp_path / "out"))
    assert code == 2 and "nowhere" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    params = {"data": {"source": "folder", "path": str(tmp_path / "empty"), "channels": 1}}
    code, err = run_cli(tmp_path, capsys, params, "prepare", "--out", str(tmp_path / "out"))
    assert code == 2 and "empty" in err and not (tmp_path / "out").exists()


def test_unreadable_image(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(np.full((10, 10), 40 * k, np.uint8)).save(folder / f"{k}.png")
    (folder / "bad.png").write_bytes((folder / "0.png").read_bytes()[:30])
    params = {"data": {"source": "folder", "path": str(folder), "channels": 1}}
    code, err = run_cli(tmp_path, capsys, params, "prepare", "--out", str(tmp_path / "out"))
    assert code == 2 and "bad.png" in err and not (tmp_path / "out").exists()


def test_missing_teacher_folder_and_missing_files(tmp_path, capsys):
    code, err = run_cli(tmp_path, capsys, {}, "sample", "--model", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "out"))
    assert code == 2 and "nope" in err and "unet/config.json" in err
    assert not (tmp_path / "out").exists()


def test_bad_cli_option_values(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sample", "--num-images", "0"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--set", "nonsense"])
