"""The benchmark's bookkeeping by hand: compute, targets, the report and the results page generated from it;
the attribution's hybrid samplers against the samplers they are made of."""
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import sfddm_core
from benchmarks import attribution, quality, report, saturation
from conftest import TINY_PARAMS, make_unet
from sfddm_cli import cli
from sfddm_core import config, diffusion, io, models, samplers, students
from sfddm_core.errors import SfddmError
from sfddm_core.methods import METHODS
from sfddm_core.methods import sfddm as sfddm_method

ROOT = Path(__file__).resolve().parents[1]


def test_forward_equivalents_count_the_students_backward_as_two_forwards():
    compute = {"teacher_forwards": 600 * 128 * 8, "student_updates": 600}
    assert quality.forward_equivalents(compute, 128) == 600 * 128 * 8 + 3 * 600 * 128


def test_compute_to_reach_is_the_first_point_at_or_below_the_target():
    curve = [{"compute": 10, "fid": 90.0}, {"compute": 20, "fid": 40.0}, {"compute": 30, "fid": 45.0}]
    assert quality.compute_to_reach(curve, 40.0) == 20
    assert quality.compute_to_reach(curve, 50.0) == 20
    assert quality.compute_to_reach(curve, 39.9) is None


def test_every_variant_is_a_valid_config_and_differs_from_base_only_where_it_says():
    cfg = config.load(ROOT / "params.yaml")
    base = config.to_dict(quality.variant_config(cfg, "fast", {}))
    assert base["distill"]["iterations"] == quality.PROFILES["fast"]["distill.iterations"]
    for name, overrides in quality.sweep().items():
        variant = config.to_dict(quality.variant_config(cfg, "fast", overrides))
        changed = {f"{section}.{key}" for section in base if isinstance(base[section], dict)
                   for key in base[section] if base[section][key] != variant[section][key]}
        assert changed <= set(overrides), name


def test_the_sweep_is_the_general_questions_and_each_methods_own_run_with_that_method(monkeypatch):
    assert quality.sweep()["base"] == {} and quality.sweep()["lr=2e-3"] == {"distill.lr": 2e-3}
    assert quality.sweep()["K=2"] == {"distill.method": "sfddm", "distill.substeps": 2}
    assert quality.sweep()["progressive steps=10"] == {"distill.method": "progressive", "student.steps": 10}
    # A method put in the table, with no questions of its own: one variant named after it, in the fast profile.
    monkeypatch.setitem(METHODS, "toy", dataclasses.replace(METHODS["progressive"], name="toy", variants=None))
    assert quality.sweep()["toy"] == {"distill.method": "toy"}
    assert "toy" in quality.profile_variants("fast") and "iterations=1900" not in quality.profile_variants("fast")
    assert "toy" not in quality.profile_variants("full")
    monkeypatch.setitem(METHODS, "toy", dataclasses.replace(METHODS["progressive"], name="toy",
                                                            variants={"K=2": {"distill.substeps": 2}}))
    with pytest.raises(SfddmError, match="'toy': variant name 'K=2' is already in the sweep"):
        quality.sweep()


def test_stored_results_follow_the_library_code_but_not_the_stage_wrappers(tmp_path, monkeypatch):
    library = tmp_path / "sfddm_core"
    shutil.copytree(Path(sfddm_core.__file__).parent, library, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(sfddm_core, "__file__", str(library / "__init__.py"))
    cfg = config.load(ROOT / "params.yaml")
    before = quality.settings_hash(cfg, "teacher")
    with open(library / "stages.py", "a") as handle:
        handle.write("# a stage wrapper's change\n")
    assert quality.settings_hash(cfg, "teacher") == before
    with open(library / "methods" / "sfddm.py", "a") as handle:
        handle.write("# a method's change\n")
    assert quality.settings_hash(cfg, "teacher") != before


def _variant(nfe, fids, method="sfddm", curve=((1000, 500.0), (4000, 30.0)), kid=(1.0, 3.0), consistency=0.2):
    """A variant's result as quality.quality stores it: fids over the seed-set reruns, the first the main one."""
    return {"nfe": nfe, "fid": fids[0], "method": method, "phi": list(range(nfe)), "consistency_ratio": consistency,
            "reruns": [{"fid": f, "kid": kid[0], "kid_std": kid[1]} for f in fids],
            "settings": {"student": {"spacing": "trailing"}},
            "compute": {"forward_equivalents": curve[-1][0], "student_updates": 10, "seconds": 1.0},
            "curve": [{"compute": c, "fid": f} for c, f in curve]}


def _baseline(nfe, fids, kid=(1.0, 3.0)):
    return {"nfe": nfe, "fid": fids[0], "reruns": [{"fid": f, "kid": kid[0], "kid_std": kid[1]} for f in fids]}


def test_targets_are_judged_on_the_means_over_seed_sets():
    quality = {
        "baselines": {"teacher_ddpm": _baseline(1000, [18.0, 22.0], kid=(1.0, 2.0)),    # mean 20
                      "teacher_ddim 4 trailing": _baseline(4, [90.0, 110.0]),             # mean 100
                      "teacher_ddim 2 trailing": _baseline(2, [500.0]),
                      "teacher_ddim 4 leading": _baseline(4, [10.0]),
                      "teacher_ddim 10 trailing": _baseline(10, [30.0])},
        "variants": {"base": _variant(4, [10.0, 12.0], kid=(4.0, 1.0), consistency=0.31,      # mean 11
                                      curve=((1000, 60.0), (3000, 35.0), (4000, 13.0))),
                     "steps=2": _variant(2, [31.0]),
                     "steps=10": _variant(10, [27.0]),
                     "progressive": _variant(4, [40.0], "progressive", curve=((10000, 40.0),))}}
    speed = {"sampling": {"speedup": 230.0, "ideal_speedup": 250.0, "fraction_of_ideal": 0.92},
             "loop": {"ours_ms_per_step": 1.0, "diffusers_ms_per_step": 1.2, "ours_over_diffusers": 0.833,
                      "ours_overhead_us_per_step": 150.0, "diffusers_overhead_us_per_step": 300.0,
                      "overhead_ours_over_diffusers": 0.5}}
    rows = {target: (measured, verdict) for target, measured, verdict in
            report.quality_targets(quality) + report.speed_targets(speed)}
    assert [verdict for _, verdict in rows.values()] == [
        "met",            # 11 <= 0.9 x 20
        "**missed**",     # T' = 2: 31 > 1.1 x 20
        "met",            # 11 <= 0.12 x 100
        "met",            # T' = 10: 27 <= 0.9 x 30
        "**missed**",     # KID 4 > 1 + 2 x 1
        "**missed**",     # consistency 0.31 > 0.3
        "met",            # progressive's 40 first reached at compute 3000 = 0.3 x 10000
        "met", "met"]     # speed
    assert rows["T' = 4: FID <= 0.12 x teacher DDIM at 4 steps"][0] == "11.00 / 100.00 = 0.110 x"
    assert any(m.startswith("0.300 x") for m, _ in rows.values())
    # The RGB targets on another dataset's sweep: no KID or consistency target, no T' = 2 or 10 target.
    rows = {target: (measured, verdict) for target, measured, verdict in
            report.quality_targets({**quality, "dataset": "photos16"})}
    assert {target: verdict for target, (_, verdict) in rows.items()} == {
        "T' = 4: FID <= 1.3 x teacher DDPM at 1000 steps": "met",     # 11 <= 1.3 x 20
        "T' = 4: FID <= 0.4 x teacher DDIM at 4 steps": "met",        # 11 <= 0.4 x 100
        "T' = 4: SFDDM reaches progressive's FID (40.00) with <= 0.5 x its compute (same seeds)": "met"}


def test_mean_sd_over_reruns_and_without():
    assert report.mean_sd(_baseline(4, [1.0, 3.0])) == (2.0, pytest.approx(2 ** 0.5))
    assert report.mean_sd({"fid": 5.0}) == (5.0, 0.0)


def test_results_section_demotes_headings_and_points_plots_at_the_report_folder():
    md = "# Benchmark\n\nintro\n\n## Quality\n\n![a](benchmark_fast_fid_vs_nfe.png)\n"
    assert report.results_section(md, "../reports") == \
        "intro\n\n### Quality\n\n![a](../reports/benchmark_fast_fid_vs_nfe.png)"


def test_update_results_page_replaces_only_the_marked_block(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "reports").mkdir()
    page, benchmark_md = tmp_path / "docs" / "benchmarks.md", tmp_path / "reports" / "benchmark.md"
    page.write_text(f"top\n{report.RESULTS_BEGIN}\nold\n{report.RESULTS_END}\nbottom\n")
    benchmark_md.write_text("# Benchmark\n\nnew numbers ![p](benchmark_x.png)\n")
    report.update_results_page(page, benchmark_md)
    assert page.read_text() == (f"top\n{report.RESULTS_BEGIN}\nnew numbers ![p](../reports/benchmark_x.png)\n"
                                f"{report.RESULTS_END}\nbottom\n")


def test_results_page_is_generated_from_the_committed_report():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    begin = page.index(report.RESULTS_BEGIN) + len(report.RESULTS_BEGIN)
    section = page[begin:page.index(report.RESULTS_END)].strip()
    assert section == report.results_section((ROOT / "reports/benchmark.md").read_text(), "../reports")


def test_the_committed_report_is_rendered_from_the_committed_results():
    results = ROOT / "reports" / "bench"
    qualities = report.load_qualities(results)
    assert list(qualities)[:2] == ["fast", "full"] and "fast-photos16" in qualities
    speed, preemption, serving = (json.loads((results / f"{name}.json").read_text())
                                  for name in ("speed", "preemption", "serving"))
    attributions = report.load_attributions(results)
    assert list(attributions)[0] == "attribution"
    assert report.render(qualities, speed, preemption, attributions, serving) == \
        (ROOT / "reports" / "benchmark.md").read_text()


def test_every_plot_the_report_and_the_results_page_show_is_committed():
    for page in (ROOT / "reports" / "benchmark.md", ROOT / "docs" / "benchmarks.md"):
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text())
        assert len(links) >= 2 * len(report.load_qualities(ROOT / "reports" / "bench"))
        for link in links:
            assert (page.parent / link).is_file(), f"{page.name} shows {link}, which is not there"


def test_serving_section_is_rendered_from_serving_json(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "serving.json").write_text(json.dumps({
        "machine": "CPU", "trained": False, "model": "8x8x1 images", "warmup": 3, "requests": 40, "repeats": 3,
        "shapes": {"16 images": {"rows": 1, "images_per_request": 16, "requests": 40, "seconds": [2.0, 1.6, 2.5],
                                 "requests_per_second": [20.0, 25.0, 16.0],
                                 "images_per_second": [320.0, 400.0, 256.0]}}}))
    text = report.write(tmp_path).read_text()
    assert "## Serving" in text and "3 rounds of 40 timed requests" in text
    assert "| 16 images | 16 | 20.0 (16.0-25.0) | 320.0 (256.0-400.0) | 50.0 (40.0-62.5) |" in text


def test_unknown_variant_is_refused(tmp_path):
    cfg = config.load(ROOT / "params.yaml")
    with pytest.raises(Exception, match="unknown"):
        quality.quality(cfg, tmp_path, tmp_path, tmp_path, tmp_path, tmp_path, variants=["nope"])


def test_teacher_identity_follows_the_network_and_schedule_not_the_provenance(tmp_path):
    for name, text in (("unet/config.json", "{}"), ("unet/diffusion_pytorch_model.safetensors", "w"),
                       ("scheduler/scheduler_config.json", "{}"), ("sfddm_config.yaml", "a: 1"),
                       ("sfddm.json", "{}")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = quality.teacher_identity(tmp_path)
    (tmp_path / "sfddm_config.yaml").write_text("a: 2")       # a setting the teacher does not depend on
    assert quality.teacher_identity(tmp_path) == before
    (tmp_path / "unet/diffusion_pytorch_model.safetensors").write_text("w2")
    assert quality.teacher_identity(tmp_path) != before


def test_training_images_are_distinct_rows_of_the_train_split_seeded_by_the_seed_set(tmp_path):
    cfg = config.load(ROOT / "params.yaml")
    sfddm_core.data.prepare(cfg.data, cfg.seed, tmp_path)
    train, _ = sfddm_core.data.load_split(tmp_path, "train")
    seed_sets = [np.arange(100) + k * 10**6 for k in range(2)]
    first, second = (quality.training_images(train, seeds) for seeds in seed_sets)
    rows = {image.tobytes(): i for i, image in enumerate(train)}
    assert first.shape == (100, *train.shape[1:]) and len({image.tobytes() for image in first}) == 100
    assert all(image.tobytes() in rows for image in first)
    assert np.array_equal(quality.training_images(train, seed_sets[0]), first)
    assert not np.array_equal(first, second)


def test_saturation_counts_the_values_at_either_end_of_the_uint8_range(tmp_path, capsys):
    images = np.array([[[[0, 1, 128, 254, 255, 255, 7, 9]]]], dtype=np.uint8)      # 3 of 8 saturated
    np.savez(tmp_path / "samples.npz", images=images)
    assert saturation.saturated_fraction(images) == 3 / 8
    assert saturation.main([str(tmp_path / "samples.npz")]) == 0
    assert capsys.readouterr().out == f"0.375  1x1x1x8  {tmp_path / 'samples.npz'}\n"
    with pytest.raises(ValueError, match="dtype float32; expected uint8"):
        saturation.saturated_fraction(images.astype(np.float32))
    np.savez(tmp_path / "other.npz", labels=np.zeros(3))
    assert saturation.main([str(tmp_path / "samples.npz"), str(tmp_path / "other.npz")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "other.npz" in captured.err


def test_hybrid_sampler_is_the_students_ddim_or_the_teachers_ode_along_the_targets_path(linear_abar):
    teacher_unet, student_unet = make_unet(0), make_unet(1)
    phi = diffusion.student_timesteps(1000, 4, "trailing")
    schedule = diffusion.StudentSchedule(phi, linear_abar)
    student = models.DiffusionModel(student_unet, schedule.abar_student, clip_denoised=True)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    students_ddim = samplers.ddim_sample(student_unet, x, range(4), schedule.abar_student)
    assert torch.equal(attribution.hybrid_sample(teacher_unet, student, schedule, 8, set(), x), students_ddim)
    path = sfddm_method.target_timesteps({"distill": {"trajectory_weight": 1.0, "substeps": 8},
                                          "teacher": {"num_train_timesteps": 1000},
                                          "student": {"steps": 4, "spacing": "trailing"}})
    teachers_ode = samplers.ddim_sample(teacher_unet, x, path, linear_abar, clip_denoised=False)
    torch.testing.assert_close(attribution.hybrid_sample(teacher_unet, student, schedule, 8, {0, 1, 2, 3}, x), teachers_ode)


def test_local_error_is_zero_for_a_student_that_takes_the_teachers_own_step(linear_abar):
    """With K = 1 the target of step i is one teacher DDIM step phi_i -> phi_{i-1}; the teacher-initialised
    student (time embedding re-solved: it computes at i what the teacher computes at phi_i) takes exactly
    that step when it does not clip, and a random student does not."""
    teacher_unet = make_unet(0)
    phi = diffusion.student_timesteps(1000, 4, "trailing")
    schedule = diffusion.StudentSchedule(phi, linear_abar)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    copy = models.DiffusionModel(students.initial_student(teacher_unet, phi, "teacher", 0).eval(),
                                 schedule.abar_student, clip_denoised=False)
    errors = attribution.local_errors(teacher_unet, copy, schedule, 1, x)
    assert sorted(errors) == [0, 1, 2, 3] and max(errors.values()) < 1e-5
    other = models.DiffusionModel(make_unet(1), schedule.abar_student, clip_denoised=False)
    assert min(attribution.local_errors(teacher_unet, other, schedule, 1, x).values()) > 100 * max(errors.values())


def test_attribution_section_names_each_step_and_both_hybrids():
    def row(fid):
        return {"fid": fid, "kid": 1.0, "kid_std": 0.1, "reruns": [{"fid": fid, "kid": 1.0}, {"fid": fid + 2, "kid": 1.0}]}
    attribution = {"student_dir": "models/student", "method": "sfddm", "substeps": 8, "phi": [499, 999],
                   "machine": "CPU", "feature_network": "f", "num_samples": 10, "rerun_seed_sets": 2,
                   "teacher_ddpm": row(20.0), "teacher_ode": row(18.0), "student": row(22.0),
                   "steps": [{"step": 1, "t": 999, "s": 499, "local_error": 0.05, "teacher_takes_this_step": row(21.0),
                              "student_takes_only_this_step": row(19.0)},
                             {"step": 0, "t": 499, "s": -1, "local_error": 0.1, "teacher_takes_this_step": row(18.5),
                              "student_takes_only_this_step": row(21.5)}]}
    text = "\n".join(report.attribution_section(attribution))
    assert text.startswith("## Where the student's distance to its teacher comes from, dataset `digits`")
    assert "| student (every step by the student) | 23.00 ± 1.41 |" in text
    assert "| 1 (999 -> 499) | 0.050 | 22.00 ± 1.41 | 20.00 ± 1.41 |" in text
    assert "| 0 (499 -> data) | 0.100 | 19.50 ± 1.41 | 22.50 ± 1.41 |" in text


@pytest.mark.integration
def test_bench_attribution_runs_on_a_distilled_student_and_refuses_other_methods(tiny_chain, tmp_path, capsys):
    def attribution_of(student) -> int:
        return cli.main(["bench", "attribution", "--student", str(student), "--params", str(tiny_chain.params),
                         "--teacher", str(tiny_chain.teacher), "--data", str(tiny_chain.data), "--classifier",
                         str(tiny_chain.classifier), "--teacher-samples", str(tiny_chain.samples),
                         "--out", str(tmp_path / "bench")])

    assert attribution_of(tiny_chain.student) == 0
    result = json.loads((tmp_path / "bench/bench/attribution.json").read_text())
    assert result["substeps"] == 4 and result["phi"] == [24, 49, 74, 99]       # T = 100, T' = 4, trailing
    assert [row["step"] for row in result["steps"]] == [3, 2, 1, 0]
    assert all(len(row["teacher_takes_this_step"]["reruns"]) == quality.RERUN_SEED_SETS for row in result["steps"])
    assert "| 0 (24 -> data) |" in (tmp_path / "bench/benchmark.md").read_text()

    # The check reads the settings the student was distilled with: a progressive student's is refused.
    progressive = tmp_path / "progressive"
    shutil.copytree(tiny_chain.student, progressive)
    trained_with = config.to_dict(config.load(progressive / "sfddm_config.yaml"))
    trained_with["distill"]["method"] = "progressive"
    (progressive / "sfddm_config.yaml").write_text(yaml.safe_dump(trained_with))
    provenance = {key: value for key, value in io.student_provenance(progressive).items() if key != "files"}
    models.write_manifest(progressive, {**provenance, "method": "progressive"})     # re-sealed as distill would
    capsys.readouterr()
    assert attribution_of(progressive) == 2
    assert "distilled by 'progressive', expected a method whose targets follow" in capsys.readouterr().err


@pytest.mark.integration
def test_an_interrupted_ddpm_rerun_resumes_from_its_last_whole_batch(tiny_chain, tmp_path, monkeypatch):
    """A rerun seed set's teacher DDPM is made a batch at a time: stopped after its first batch, the next
    run samples only the second, and the set holds the images an uninterrupted run makes."""
    cfg = config.load(tiny_chain.params, {"evaluate.batch_size": 20})      # 40 samples: two batches

    def bench(store: Path) -> quality.QualityBench:
        return quality.QualityBench(cfg, tiny_chain.teacher, tiny_chain.data, tiny_chain.classifier,
                                    tiny_chain.samples, store)

    whole = bench(tmp_path / "whole").ddpm_images(1)
    at_once = bench(tmp_path / "at_once")
    np.testing.assert_array_equal(whole, at_once.sample(at_once.teacher, None, 1, "ddpm"))     # as stored before
    interrupted, sampled = bench(tmp_path / "interrupted"), []
    sample = interrupted.sample

    def sample_then_stop(*args):
        if len(sampled) == 1:
            raise KeyboardInterrupt
        sampled.append(args[-1])
        return sample(*args)

    monkeypatch.setattr(interrupted, "sample", sample_then_stop)
    (tmp_path / "interrupted").mkdir()
    with pytest.raises(KeyboardInterrupt):
        interrupted.ddpm_images(1)
    assert [p.name.split(".")[-2] for p in (tmp_path / "interrupted").iterdir()] == ["0"]
    sampled.clear()
    monkeypatch.setattr(interrupted, "sample", lambda *args: sampled.append(args[-1]) or sample(*args))
    resumed = interrupted.ddpm_images(1)
    assert sampled == [slice(20, 40)]
    np.testing.assert_array_equal(resumed, whole)
    assert len(whole) == 40 and not np.array_equal(whole, interrupted.ddpm_images(0)[:40])
    assert [p.suffixes for p in (tmp_path / "interrupted").iterdir()] == [[".npz"]]   # the set alone is kept


@pytest.mark.integration
def test_the_teachers_ddim_baselines_are_kept_so_a_rerun_samples_nothing(tiny_chain, tmp_path, monkeypatch):
    cfg = config.load(tiny_chain.params, {"evaluate.batch_size": 20})
    bench = quality.QualityBench(cfg, tiny_chain.teacher, tiny_chain.data, tiny_chain.classifier, tiny_chain.samples,
                                 tmp_path)
    phi = diffusion.StudentSchedule(cfg.student_timesteps, bench.teacher.alphas_cumprod).phi
    row = bench.kept_ddim("teacher_ddim", bench.teacher, phi)
    assert row["reruns"] == [bench.distances(bench.sample(bench.teacher, phi, k))
                             for k in range(quality.RERUN_SEED_SETS)]
    monkeypatch.setattr(bench, "sample", lambda *args: pytest.fail(f"sampled again: {args}"))
    assert bench.kept_ddim("teacher_ddim", bench.teacher, phi) == row
    digest, teacher = quality.timesteps_digest(phi), bench.teacher_sha256[:16]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"teacher_ddim-{digest}-{teacher}-{seeds[0]}-{len(seeds)}.npz" for seeds in bench.seed_sets)
