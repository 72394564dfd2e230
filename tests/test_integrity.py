"""Integrity (issue 5): the sfddm.json of every model folder sfddm writes carries the sha256 of each of
its other files, and load_model refuses a changed, truncated or missing file with one line naming it;
prepared data refuses a truncated or changed split through the hashes in meta.json."""
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_PARAMS, make_unet, merged, student_provenance

from sfddm_core import config as config_lib
from sfddm_core import data, diffusion, io, models, teacher
from sfddm_core.config import DataConfig
from sfddm_core.errors import SfddmError

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
STUDENT_PROVENANCE = student_provenance([24, 49, 74, 99], teacher_timesteps=100)


def tiny_abar() -> np.ndarray:
    return diffusion.alphas_cumprod(diffusion.beta_schedule("linear", 100))


def write_teacher(folder: Path) -> Path:
    models.save_teacher(models.DiffusionModel(make_unet(), tiny_abar()), folder)
    return folder


def write_student(folder: Path) -> Path:
    betas = diffusion.student_betas(tiny_abar(), np.array(STUDENT_PROVENANCE["phi"]))
    models.save_student(make_unet(), betas, folder, STUDENT_PROVENANCE, clip_sample=False)
    return folder


WRITERS = {"teacher": write_teacher, "student": write_student}


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("role", WRITERS)
def test_sfddm_json_holds_the_sha256_of_every_other_file(tmp_path, role):
    folder = WRITERS[role](tmp_path / role)
    listed = json.loads((folder / "sfddm.json").read_text())["files"]
    assert set(listed) == files_under(folder) - {"sfddm.json"}
    assert WEIGHTS in listed and "scheduler/scheduler_config.json" in listed
    assert all(listed[name] == io.sha256_file(folder / name) for name in listed)
    models.load_model(folder)


def test_student_provenance_is_kept_beside_the_hashes(tmp_path):
    folder = write_student(tmp_path / "student")
    provenance = io.student_provenance(folder)
    assert {key: provenance[key] for key in STUDENT_PROVENANCE} == STUDENT_PROVENANCE


def change_one_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01
    path.write_bytes(bytes(content))


DAMAGES = {
    "changed": change_one_byte,
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:-1]),
    "emptied": lambda path: path.write_bytes(b""),
    "missing": lambda path: path.unlink(),
}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", [WEIGHTS, "scheduler/scheduler_config.json", "model_index.json"])
@pytest.mark.parametrize("role", WRITERS)
def test_load_model_refuses_a_damaged_file_naming_it(tmp_path, role, name, damage):
    folder = WRITERS[role](tmp_path / role)
    expected = io.sha256_file(folder / name)
    DAMAGES[damage](folder / name)
    with pytest.raises(SfddmError) as refusal:
        models.load_model(folder)
    message = str(refusal.value)
    assert "\n" not in message and message.startswith(f"{folder / name}: ")
    if damage == "missing":
        assert f"missing; sfddm.json lists it with sha256 {expected}" in message
    else:
        assert f"expected sha256 {expected}, got {io.sha256_file(folder / name)}" in message


def test_unreadable_sfddm_json_is_refused(tmp_path):
    folder = write_student(tmp_path / "student")
    path = folder / "sfddm.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(SfddmError, match=f"^{path}: unreadable .*expected the JSON object sfddm wrote"):
        models.load_model(folder)


def test_a_folder_without_sfddm_json_loads_unchecked(tmp_path):
    """A diffusers folder from elsewhere (the hub, a user) carries no hashes: loaded as it is."""
    folder = write_teacher(tmp_path / "teacher")
    (folder / "sfddm.json").unlink()
    (folder / "model_index.json").write_text((folder / "model_index.json").read_text() + "\n")
    assert models.load_model(folder).num_timesteps == 100


def test_a_student_written_before_hashes_loads_unchecked(tmp_path):
    """Students registered before sfddm.json listed hashes (provenance only) still load and serve."""
    folder = write_student(tmp_path / "student")
    (folder / "sfddm.json").write_text(json.dumps(STUDENT_PROVENANCE))
    (folder / "model_index.json").write_text((folder / "model_index.json").read_text() + "\n")
    student = models.load_model(folder)
    assert student.num_timesteps == len(STUDENT_PROVENANCE["phi"])        # the student's own T' steps
    assert np.allclose(student.alphas_cumprod, tiny_abar()[STUDENT_PROVENANCE["phi"]])


def test_teacher_stage_output_hashes_its_config_too(tmp_path):
    """A stage writes sfddm_config.yaml before sfddm.json, so the hashes cover it as well."""
    source = write_teacher(tmp_path / "pretrained")
    (source / "sfddm.json").unlink()        # as a diffusers folder from elsewhere
    cfg = config_lib.from_dict(merged(TINY_PARAMS, {"teacher": {"source": "pretrained", "uri": str(source)}}))
    out = teacher.run(cfg, tmp_path / "unused-data", tmp_path / "teacher", tmp_path / "teacher_loss.csv")
    listed = json.loads((out / "sfddm.json").read_text())["files"]
    assert set(listed) == files_under(out) - {"sfddm.json"} and "sfddm_config.yaml" in listed
    (out / "sfddm_config.yaml").write_text((out / "sfddm_config.yaml").read_text() + "# edited\n")
    with pytest.raises(SfddmError, match=r"sfddm_config\.yaml: expected sha256"):
        models.load_model(out)


# ---- prepared data: meta.json's hashes, checked by data.load_split ----

@pytest.fixture
def prepared(tmp_path) -> Path:
    out = tmp_path / "prepared"
    data.prepare(DataConfig(max_images=40), seed=0, out_dir=out)
    return out


@pytest.mark.parametrize("keep", [lambda n: n - 1, lambda n: n // 2, lambda n: 0], ids=["last-byte", "half", "all"])
def test_load_split_refuses_a_truncated_split(prepared, keep):
    path = prepared / "train.npz"
    content = path.read_bytes()
    path.write_bytes(content[:keep(len(content))])
    with pytest.raises(SfddmError, match=rf"^{path}: unreadable or truncated .*rerun `sfddm prepare`$"):
        data.load_split(prepared, "train")


def test_load_split_refuses_a_split_swapped_for_another(prepared):
    """A whole, readable .npz that is not the one meta.json describes (the other split) is refused too."""
    (prepared / "train.npz").write_bytes((prepared / "test.npz").read_bytes())
    with pytest.raises(SfddmError, match=r"train\.npz: images do not match their sha256 in meta\.json"):
        data.load_split(prepared, "train")


def test_load_split_refuses_a_truncated_meta_json(prepared):
    path = prepared / "meta.json"
    path.write_text(path.read_text()[:-10])
    with pytest.raises(SfddmError, match=rf"^{path}: unreadable"):
        data.load_split(prepared, "train")
