"""The benchmark's bookkeeping by hand: compute, targets, the report and the README generated from it."""
from pathlib import Path

import pytest

from sfddm_core import bench, bench_report, config

ROOT = Path(__file__).resolve().parents[1]


def test_forward_equivalents_count_the_students_backward_as_two_forwards():
    compute = {"teacher_forwards": 600 * 128 * 8, "student_updates": 600}
    assert bench.forward_equivalents(compute, 128) == 600 * 128 * 8 + 3 * 600 * 128


def test_compute_to_reach_is_the_first_point_at_or_below_the_target():
    curve = [{"compute": 10, "fid": 90.0}, {"compute": 20, "fid": 40.0}, {"compute": 30, "fid": 45.0}]
    assert bench.compute_to_reach(curve, 40.0) == 20
    assert bench.compute_to_reach(curve, 50.0) == 20
    assert bench.compute_to_reach(curve, 39.9) is None


def test_every_variant_is_a_valid_config_and_differs_from_base_only_where_it_says():
    cfg = config.load(ROOT / "params.yaml")
    base = config.to_dict(bench.variant_config(cfg, "fast", {}))
    assert base["distill"]["iterations"] == bench.PROFILES["fast"]["distill.iterations"]
    for name, overrides in bench.SWEEP.items():
        variant = config.to_dict(bench.variant_config(cfg, "fast", overrides))
        changed = {f"{section}.{key}" for section in base if isinstance(base[section], dict)
                   for key in base[section] if base[section][key] != variant[section][key]}
        assert changed <= set(overrides), name


def _variant(nfe, fid, method="sfddm", curve=((1000, 500.0), (4000, 30.0))):
    return {"nfe": nfe, "fid": fid, "method": method, "phi": list(range(nfe)),
            "settings": {"student": {"spacing": "trailing"}},
            "compute": {"forward_equivalents": curve[-1][0], "student_updates": 10, "seconds": 1.0},
            "curve": [{"compute": c, "fid": f} for c, f in curve]}


def test_targets_compare_the_measured_ratios():
    quality = {
        "baselines": {"teacher_ddpm": {"nfe": 1000, "fid": 20.0},
                      "teacher_ddim 4 trailing": {"nfe": 4, "fid": 100.0},
                      "teacher_ddim 4 leading": {"nfe": 4, "fid": 10.0},
                      "teacher_ddim 10 trailing": {"nfe": 10, "fid": 30.0}},
        "variants": {"base": _variant(4, 29.0, curve=((1000, 60.0), (3000, 35.0), (4000, 29.0))),
                     "steps=10": _variant(10, 31.0),
                     "progressive": _variant(4, 40.0, "progressive", curve=((10000, 40.0),))}}
    speed = {"sampling": {"speedup": 230.0, "ideal_speedup": 250.0, "fraction_of_ideal": 0.92},
             "loop": {"ours_ms_per_step": 1.0, "diffusers_ms_per_step": 1.2, "ours_over_diffusers": 0.833,
                      "ours_overhead_us_per_step": 150.0, "diffusers_overhead_us_per_step": 300.0,
                      "overhead_ours_over_diffusers": 0.5}}
    rows = {target: (measured, verdict) for target, measured, verdict in
            bench_report.quality_targets(quality) + bench_report.speed_targets(speed)}
    verdicts = [verdict for _, verdict in rows.values()]
    assert verdicts == ["met", "met", "**missed**", "met", "met", "met"]     # 29 / 20 = 1.45; 31 > 30
    assert rows["T' = 4: FID <= 0.3 x teacher DDIM at 4 steps"][0] == "29.00 / 100.00 = 0.29 x"
    # progressive's 40.0 is first reached at compute 3000, 0.3 x progressive's 10000
    assert any(m.startswith("0.300 x") for m, _ in rows.values())


def test_readme_section_demotes_headings_and_roots_image_paths():
    md = "# Benchmark\n\nintro\n\n## Quality\n\n![a](benchmark_fast_fid_vs_nfe.png)\n"
    assert bench_report.readme_section(md) == "intro\n\n### Quality\n\n![a](reports/benchmark_fast_fid_vs_nfe.png)"


def test_update_readme_replaces_only_the_marked_block(tmp_path):
    readme, report = tmp_path / "README.md", tmp_path / "benchmark.md"
    readme.write_text(f"top\n{bench_report.README_BEGIN}\nold\n{bench_report.README_END}\nbottom\n")
    report.write_text("# Benchmark\n\nnew numbers\n")
    bench_report.update_readme(readme, report)
    assert readme.read_text() == (f"top\n{bench_report.README_BEGIN}\nnew numbers\n"
                                  f"{bench_report.README_END}\nbottom\n")


def test_readme_results_are_generated_from_the_committed_report():
    readme = (ROOT / "README.md").read_text()
    begin = readme.index(bench_report.README_BEGIN) + len(bench_report.README_BEGIN)
    section = readme[begin:readme.index(bench_report.README_END)].strip()
    assert section == bench_report.readme_section((ROOT / "reports/benchmark.md").read_text())


def test_unknown_variant_is_refused(tmp_path):
    cfg = config.load(ROOT / "params.yaml")
    with pytest.raises(Exception, match="unknown"):
        bench.quality(cfg, tmp_path, tmp_path, tmp_path, tmp_path, tmp_path, variants=["nope"])
