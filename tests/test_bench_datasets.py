"""`sfddm bench quality --dataset` and `bench attribution --dataset`: the datasets' settings, where their
chains live, and a real sweep and attribution on a tiny RGB chain that the commands build and reuse."""
import json
from pathlib import Path

import pytest
import yaml

from benchmarks import datasets, quality
from conftest import TINY_PARAMS, merged
from sfddm_cli import cli
from sfddm_core import config
from sfddm_core.errors import SfddmError

ROOT = Path(__file__).resolve().parents[1]


def test_dataset_overrides_name_rgb_data_and_a_wider_unet():
    assert datasets.dataset_overrides("digits") == {}
    photos16 = datasets.dataset_overrides("photos16")
    assert photos16["data.source"] == "photos" and photos16["data.image_size"] == 16
    assert photos16["data.channels"] == 3 and photos16["teacher.unet.block_out_channels"] == [32, 64, 64]
    folder = datasets.dataset_overrides("folder:/some/images")
    assert folder["data.source"] == "folder" and folder["data.path"] == "/some/images"
    for bad in ("nope", "folder:"):
        with pytest.raises(SfddmError, match=f"--dataset: unknown '{bad}'; expected one of"):
            datasets.dataset_overrides(bad)


def test_the_users_set_wins_over_the_datasets_settings(capsys):
    assert cli.main(["bench", "quality", "--dataset", "photos16", "--set", "data.image_size=8",
                     "--params", str(ROOT / "params.yaml"), "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["source"] == "photos" and resolved["data"]["channels"] == 3
    assert resolved["data"]["image_size"] == 8


def test_results_are_named_by_profile_dataset_and_the_runs_name():
    assert datasets.result_name("fast", "digits") == "fast"
    assert datasets.result_name("attribution", "photos16") == "attribution-photos16"
    assert datasets.result_name("fast", "photos16", "teacher10k") == "fast-photos16-teacher10k"
    assert datasets.result_name("full", "digits", "lr=5e-4") == "full-lr=5e-4"


def test_a_runs_name_that_is_no_file_name_part_is_refused(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["bench", "quality", "--dataset", "photos16", "--name", "../x", "--dry-run"])
    assert stopped.value.code == 2
    assert "'../x': expected letters, digits, '_', '.' or '=' (a file-name part)" in capsys.readouterr().err


def test_a_chain_is_named_by_the_settings_it_depends_on(tmp_path):
    values = config.to_dict(config.load(ROOT / "params.yaml", datasets.dataset_overrides("photos16")))
    here = datasets.chain_dir(config.from_dict(values), "photos16", tmp_path)
    assert here.parent == tmp_path / "chains" and here.name.startswith("photos16-")
    distilled_otherwise = config.with_overrides(json.loads(json.dumps(values)), {"distill.lr": 5e-4})
    assert datasets.chain_dir(distilled_otherwise, "photos16", tmp_path) == here
    taught_otherwise = config.with_overrides(json.loads(json.dumps(values)), {"teacher.iterations": 7})
    assert datasets.chain_dir(taught_otherwise, "photos16", tmp_path) != here
    assert datasets.chain_dir(config.from_dict(values), "folder:/a/b", tmp_path).name.startswith("folder--a-b-")


@pytest.mark.integration
def test_bench_quality_on_rgb_builds_its_chain_once_and_reports_the_dataset(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(merged(TINY_PARAMS, {"teacher": {"unet": {"norm_num_groups": 4}}})))
    out = tmp_path / "reports"

    def bench(*name: str) -> int:
        return cli.main(["bench", "quality", "--dataset", "photos16", "--profile", "full", "--variants", "base",
                         "--params", str(params), "--out", str(out), "--set", "data.image_size=8",
                         "--set", "data.max_images=120", "--set", "teacher.unet.block_out_channels=[8,16,16]", *name])

    assert bench() == 0
    chain, = (out / "bench" / "quality" / "chains").iterdir()
    assert chain.name.startswith("photos16-")
    assert sorted(p.name for p in chain.iterdir()) == ["classifier.pt", "data", "params.yaml",
                                                       "samples", "teacher", "teacher_loss.csv"]
    result = json.loads((out / "bench" / "quality-full-photos16.json").read_text())
    assert result["dataset"] == "photos16" and result["dataset_overrides"]["data.source"] == "photos"
    assert result["settings_overrides"] == {"data.image_size": 8, "data.max_images": 120,
                                            "teacher.unet.block_out_channels": [8, 16, 16]}
    assert list(result["variants"]) == ["base"]
    assert "photos-classifier" in result["feature_network"]
    assert {quality.TRAINING_IMAGES, "teacher_ddpm", "teacher_ddim 4 trailing"} <= set(result["baselines"])
    assert result["baselines"][quality.TRAINING_IMAGES]["nfe"] == 0
    text = (out / "benchmark.md").read_text()
    assert "## Quality, profile `full`, dataset `photos16`\n" in text
    assert "'teacher.unet.block_out_channels': [8, 16, 16]" in text and "'data.max_images': 120" in text  # --set
    assert "T' = 4: FID <= 0.4 x teacher DDIM at 4 steps (`full-photos16`)" in text
    assert (out / "benchmark_full-photos16_fid_vs_nfe.png").is_file()
    built = {p: p.stat().st_mtime_ns for p in chain.rglob("*") if p.is_file()}
    assert bench() == 0                               # the chain and the variant are reused, not rebuilt
    assert {p: p.stat().st_mtime_ns for p in chain.rglob("*") if p.is_file() and p.name != "params.yaml"} == \
        {p: t for p, t in built.items() if p.name != "params.yaml"}
    assert quality.profile_variants("full", "photos16") == list(quality.DATASET_VARIANTS)
    assert bench("--name", "tiny") == 0              # a named run: its own results, beside the unnamed run's
    named = json.loads((out / "bench" / "quality-full-photos16-tiny.json").read_text())
    assert named["name"] == "tiny" and named["variants"] == result["variants"]
    assert json.loads((out / "bench" / "quality-full-photos16.json").read_text())["name"] is None
    text = (out / "benchmark.md").read_text()
    assert "## Quality, profile `full`, dataset `photos16`, run `tiny`" in text
    assert "(`full-photos16-tiny`)" in text and (out / "benchmark_full-photos16-tiny_fid_vs_nfe.png").is_file()

    # bench attribution on the same dataset reuses the chain and distils its student there, once.
    def attribution() -> int:
        return cli.main(["bench", "attribution", "--dataset", "photos16", "--params", str(params), "--out", str(out),
                         "--set", "data.image_size=8", "--set", "data.max_images=120",
                         "--set", "teacher.unet.block_out_channels=[8,16,16]"])

    assert attribution() == 0
    student, = (chain / "students").glob("*/sfddm.json")
    attributed = json.loads((out / "bench" / "attribution-photos16.json").read_text())
    assert attributed["dataset"] == "photos16" and attributed["student_dir"] == str(student.parent)
    assert [row["step"] for row in attributed["steps"]] == [3, 2, 1, 0]
    assert "## Where the student's distance to its teacher comes from, dataset `photos16`" in \
        (out / "benchmark.md").read_text()
    distilled = student.stat().st_mtime_ns
    assert attribution() == 0 and student.stat().st_mtime_ns == distilled
    assert (chain / "teacher" / "sfddm.json").stat().st_mtime_ns == built[chain / "teacher" / "sfddm.json"]
