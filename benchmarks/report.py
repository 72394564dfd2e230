"""reports/benchmark.md and its plots, rendered from the JSON the benchmarks write (`sfddm bench quality`,
`attribution`, `speed`, `preemption` and benchmarks/serving.py); and the results page's generated section
(docs/benchmarks.md), from reports/benchmark.md."""
from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path
from typing import Optional

import numpy as np

from sfddm_core.io import atomic_file, atomic_write_text
from sfddm_core.methods import METHODS

from .datasets import DEFAULT_DATASET
from .quality import compute_to_reach, ddim_baseline_name

RESULTS_BEGIN, RESULTS_END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"
# (SFDDM variants, the progressive variant) at equal T': where SFDDM's FID curves first reach progressive's final FID
PROGRESSIVE_PAIRS = ((("base", "iterations=1900"), "progressive"), (("steps=10",), "progressive steps=10"))
# The quality targets of the benchmark issues, per dataset: the student at T' steps (the variant "base" or
# "steps=T'") against the teacher's DDPM over T steps and its DDIM on the student's T' timesteps, as
# {T': largest ratio of mean FIDs}; at T' = 4 on digits also KID and consistency with the teacher's ODE.
QUALITY_TARGETS = {
    "digits": {"ddpm": {4: 0.9, 2: 1.1}, "ddim": {4: 0.12, 10: 0.9}, "kid_and_consistency": True},
    "photos16": {"ddpm": {4: 1.3}, "ddim": {4: 0.4}, "kid_and_consistency": False},
}


def _load(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _check(ok: bool) -> str:
    return "met" if ok else "**missed**"


def plot_files(name: str) -> dict[str, str]:
    """The plots of a sweep (datasets.result_name: its profile, and its dataset unless digits)."""
    return {axis: f"benchmark_{name}_fid_vs_{axis}.png" for axis in ("nfe", "compute")}


def mean_sd(row: dict, key: str = "fid") -> tuple[float, float]:
    """Mean and standard deviation of a measurement over its seed-set reruns (just the value without)."""
    values = np.array([rerun[key] for rerun in row.get("reruns", [row])])
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _shown(row: dict, key: str = "fid") -> str:
    mean, sd = mean_sd(row, key)
    digits = 2 if key == "fid" else 3
    return f"{mean:.{digits}g} ± {sd:.{digits}g}" if key != "fid" else f"{mean:.2f} ± {sd:.2f}"


def quality_targets(quality: dict) -> list[tuple[str, str, str]]:
    """(target, measured, met / missed) for each quality target of the benchmark issues that was
    measured (QUALITY_TARGETS of the sweep's dataset, and SFDDM's compute against progressive's); FIDs
    and KIDs are means over the seed-set reruns."""
    rows = []
    if not quality:
        return rows
    variants, baselines = quality["variants"], quality["baselines"]
    ddpm = baselines["teacher_ddpm"]
    ddpm_fid, ddpm_kid = mean_sd(ddpm)[0], mean_sd(ddpm, "kid")[0]
    targets = QUALITY_TARGETS.get(quality.get("dataset", DEFAULT_DATASET), {})

    def student(steps):
        v = variants.get("base" if steps == 4 else f"steps={steps}")
        return v if v and v["nfe"] == steps else None

    for steps, ratio in sorted(targets.get("ddpm", {}).items(), reverse=True):
        if v := student(steps):
            fid_s = mean_sd(v)[0]
            rows.append((f"T' = {steps}: FID <= {ratio} x teacher DDPM at {ddpm['nfe']} steps",
                         f"{fid_s:.2f} / {ddpm_fid:.2f} = {fid_s / ddpm_fid:.2f} x", _check(fid_s <= ratio * ddpm_fid)))
    for steps, ratio in sorted(targets.get("ddim", {}).items()):
        if (v := student(steps)) and ddim_baseline_name(v) in baselines:
            fid_s, ddim = mean_sd(v)[0], mean_sd(baselines[ddim_baseline_name(v)])[0]
            rows.append((f"T' = {steps}: FID <= {ratio} x teacher DDIM at {steps} steps",
                         f"{fid_s:.2f} / {ddim:.2f} = {fid_s / ddim:.3f} x", _check(fid_s <= ratio * ddim)))
    if targets.get("kid_and_consistency") and (base := student(4)):
        kid_s, kid_sd = mean_sd(base, "kid")[0], mean_sd(base, "kid_std")[0]
        rows.append(("T' = 4: KID <= teacher DDPM's + 2 x KID std",
                     f"{kid_s:.4g} vs {ddpm_kid:.4g} + 2 x {kid_sd:.4g}", _check(kid_s <= ddpm_kid + 2 * kid_sd)))
        rows.append(("T' = 4: consistency ratio with the teacher's ODE <= 0.3",
                     f"{base['consistency_ratio']:.3f}", _check(base["consistency_ratio"] <= 0.3)))
    for ours, theirs in PROGRESSIVE_PAIRS:
        p = variants.get(theirs)
        candidates = [variants[name] for name in ours if name in variants]
        if not p or not candidates or any(s["nfe"] != p["nfe"] for s in candidates):
            continue
        spent = p["compute"]["forward_equivalents"]
        reached = [c for c in (compute_to_reach(s["curve"], p["fid"]) for s in candidates) if c is not None]
        best = min(candidates, key=lambda s: s["fid"])
        theirs_to_ours = compute_to_reach(p["curve"], best["fid"])
        crossing = (f"; progressive's curve reaches SFDDM's best ({best['fid']:.2f}) at "
                    f"{theirs_to_ours / spent:.2f} x its compute" if theirs_to_ours is not None else
                    f"; progressive's curve never reaches SFDDM's best ({best['fid']:.2f})")
        target = (f"T' = {p['nfe']}: SFDDM reaches progressive's FID ({p['fid']:.2f}) with <= 0.5 x its "
                  "compute (same seeds)")
        if not reached:
            rows.append((target, f"not reached: SFDDM's best ended at {best['fid']:.2f} after "
                                 f"{best['compute']['forward_equivalents'] / spent:.2f} x its compute" + crossing,
                         _check(False)))
        else:
            needed = min(reached)
            rows.append((target, f"{needed / spent:.3f} x ({needed:.3g} vs {spent:.3g} forward equivalents)" + crossing,
                         _check(needed <= 0.5 * spent)))
    return rows


def preemption_targets(preemption: dict) -> list[tuple[str, str, str]]:
    """A run SIGKILLed at 60% of its time and rerun: the rerun under 0.75 x a run from scratch."""
    return [(f"`sfddm distill` on {n} process{'es' if n != '1' else ''}, SIGKILLed at "
             f"{preemption['kill_at']:.0%} and rerun: rerun < 0.75 x a run from scratch",
             f"{row['rerun_s']} s / {row['scratch_s']} s = {row['rerun_over_scratch']:.2f} x (resumed at update "
             f"{row['resumed_at']} of {preemption['iterations']})", _check(row["rerun_over_scratch"] < 0.75))
            for n, row in (preemption or {}).get("processes", {}).items()]


def speed_targets(speed: dict) -> list[tuple[str, str, str]]:
    rows = []
    if speed:
        sampling, loop = speed["sampling"], speed["loop"]
        rows.append(("student speed >= 0.9 x T/T' x teacher (per image)",
                     f"{sampling['speedup']:.1f} x of ideal {sampling['ideal_speedup']:.0f} x = "
                     f"{sampling['fraction_of_ideal']:.3f}", _check(sampling["fraction_of_ideal"] >= 0.9)))
        rows.append(("our DDIM loop no slower per step than diffusers' (its own overhead)",
                     f"{loop['ours_overhead_us_per_step']:.1f} vs {loop['diffusers_overhead_us_per_step']:.1f} "
                     f"us/step = {loop['overhead_ours_over_diffusers']:.3f} x",
                     _check(loop["overhead_ours_over_diffusers"] <= 1.0)))
    return rows


def _run_name(result: dict) -> str:
    """A run named by --name, as its heading's last part."""
    return f", run `{result['name']}`" if result.get("name") else ""


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def _objective(settings: dict) -> str:
    """The distillation a variant ran: its method's objective, then the settings shared by all methods."""
    d, student = settings["distill"], settings["student"]
    extras = [f"init {student['init']}"] if student["init"] != "teacher" else []
    extras += ["clipped sub-steps"] if d["clip_substeps"] else []
    extras += ["sampler unclipped"] if not student["clip_denoised"] else []
    extras += [f"lr {d['lr']:g} {d['lr_decay']}"]
    return METHODS[d["method"]].describe(settings) + "; " + ", ".join(extras)


def attribution_section(attribution: dict) -> list[str]:
    """sfddm bench attribution's tables: the whole samplers, then each step by the other network."""
    a = attribution
    lines = [f"## Where the student's distance to its teacher comes from, dataset `{a.get('dataset', DEFAULT_DATASET)}`"
             f"{_run_name(a)}", "",
             f"`sfddm bench attribution` on `{a['student_dir']}` ({a['method']}, K = {a['substeps']}, phi = "
             f"{a['phi']}{', --set ' + str(a['settings_overrides']) if a.get('settings_overrides') else ''}). "
             f"Machine: {a['machine']}. {a['num_samples']} samples per row, features of "
             f"{a['feature_network']}; mean ± standard deviation over {a['rerun_seed_sets']} seed sets, those of "
             "the quality sweep. The samplers below take each student step either by the student (one network "
             "evaluation, x0-hat clipped as its sampler does) or by what that step was trained to copy: the "
             "teacher's unclipped DDIM over K sub-steps. A step's local error is the RMS distance between the "
             "two from the same state on the teacher's path, relative to the RMS of the teacher's result.", ""]
    lines += _table(["sampler", "FID", "KID"], [
        ["teacher DDPM, T steps", _shown(a["teacher_ddpm"]), _shown(a["teacher_ddpm"], "kid")],
        ["teacher's ODE along the targets' path (every step by the teacher)", _shown(a["teacher_ode"]),
         _shown(a["teacher_ode"], "kid")],
        ["student (every step by the student)", _shown(a["student"]), _shown(a["student"], "kid")]])
    lines += [""] + _table(
        ["step i (teacher t -> s)", "local error", "FID, student but step i by the teacher",
         "FID, teacher but step i by the student"],
        [[f"{row['step']} ({row['t']} -> {'data' if row['s'] < 0 else row['s']})", f"{row['local_error']:.3f}",
          _shown(row["teacher_takes_this_step"]), _shown(row["student_takes_only_this_step"])]
         for row in a["steps"]]) + [""]
    return lines


def serving_section(serving: dict) -> list[str]:
    """benchmarks/serving.py's table: requests and images per second of each request shape, median
    (min-max) over the rounds."""
    def spread(values):
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"
    student = ("`models/student` (trained)" if serving["trained"] else
               "the default config's student architecture, untrained (a request's time does not depend on "
               "the weights)")
    lines = ["## Serving", "",
             f"Machine: {serving['machine']}. `mlflow models serve` (through `sfddm serve`: one uvicorn worker, "
             f"`--env-manager local`) on 127.0.0.1 serving {student}: {serving['model']}. One client sends "
             "JSON requests (`dataframe_split`) one after another and decodes each answer. "
             f"{serving['warmup']} warm-up requests of each shape, then {serving['repeats']} rounds of "
             f"{serving['requests']} timed requests of each shape in turn: median (min-max) over the rounds. "
             "`python -m benchmarks.serving`; rerun on a quiet machine for figures to compare.", ""]
    rows = []
    for name, shape in serving["shapes"].items():
        ms = [1000 * s / shape["requests"] for s in shape["seconds"]]
        rows.append([name, shape["images_per_request"], spread(shape["requests_per_second"]),
                     spread(shape["images_per_second"]), spread(ms)])
    return lines + _table(["request", "images per request", "requests/s", "images/s", "ms per request"], rows) + [""]


def render(qualities: dict[str, dict], speed: Optional[dict], preemption: Optional[dict] = None,
           attributions: Optional[dict[str, dict]] = None, serving: Optional[dict] = None) -> str:
    """The report: a quality section per sweep measured (profile and dataset), an attribution section per
    dataset attributed, the speed section, the targets, the serving section."""
    lines = ["# Benchmark", "",
             "Generated by `sfddm bench quality`, `attribution`, `speed`, `preemption` and `python -m "
             "benchmarks.serving` (`make bench`) from `reports/bench/*.json`; do not edit by hand.", ""]
    for name, quality in qualities.items():
        reruns = quality.get("rerun_seed_sets", 1)
        dataset = quality.get("dataset", DEFAULT_DATASET)
        settings = {**quality.get("dataset_overrides", {}), **quality.get("settings_overrides", {}),
                    **quality["overrides"]}
        lines += [f"## Quality, profile `{quality['profile']}`, dataset `{dataset}`{_run_name(quality)}", "",
                  f"Machine: {quality['machine']}. Profile `{quality['profile']}` on `{dataset}` (settings of "
                  f"params.yaml with {settings or 'no overrides'}). {quality['num_samples']} samples per "
                  f"row against the test split, features of {quality['feature_network']}; comparable within "
                  f"this report only. FID and KID: mean ± standard deviation over {reruns} disjoint seed "
                  "sets (the first is `sfddm evaluate`'s; FID curves use it alone), so the ± is the noise "
                  "of a number from the choice of noise seeds. KID (unbiased; kernel (x.y / d + 1)^3 on these "
                  "features) is the mean over 100 subsets of half of each set. Training compute in forward "
                  "equivalents: images through a teacher network plus 3 per student image per update "
                  "(forward and backward).", ""]
        lines += _table(["baseline", "network evaluations", "FID", "KID"],
                        [[name.replace("teacher_ddpm", "teacher DDPM").replace("teacher_ddim", "teacher DDIM"),
                          b["nfe"], _shown(b), _shown(b, "kid")] for name, b in quality["baselines"].items()])
        lines += [""]
        rows = []
        for variant, v in quality["variants"].items():
            ddim = mean_sd(quality["baselines"][ddim_baseline_name(v)])[0]
            st = v["settings"]
            rows.append([variant, v["nfe"], st["student"]["spacing"], _objective(st), _shown(v),
                         f"{mean_sd(v)[0] / ddim:.3f}", _shown(v, "kid"),
                         f"{v['consistency_ratio']:.3f}", v["compute"]["student_updates"],
                         f"{v['compute']['forward_equivalents']:.3g}", f"{v['compute']['seconds']:.0f}"])
        lines += _table(["variant", "T'", "spacing", "objective", "FID", "FID / teacher DDIM", "KID",
                         "consistency", "updates", "compute", "train s"], rows)
        plots = plot_files(name)
        lines += ["", f"![FID against network evaluations]({plots['nfe']})",
                  f"![FID against training compute]({plots['compute']})", ""]
    for attribution in (attributions or {}).values():
        lines += attribution_section(attribution)
    if speed:
        s, loop, tr = speed["sampling"], speed["loop"], speed["training"]
        lines += ["## Speed", "", f"Machine: {speed['machine']}; bf16 autocast, channels_last and torch.compile "
                  f"{'on' if speed['fast_gpu'] else 'off'}; peak memory {speed['peak_memory_mib']} MiB.", ""]
        lines += _table(["measurement", "value"], [
            [f"teacher, DDIM over {s['teacher_steps']} steps, batch {s['batch_size']}",
             f"{s['teacher_images_per_second']} images/s"],
            [f"student, DDIM over {s['student_steps']} steps, batch {s['batch_size']}",
             f"{s['student_images_per_second']} images/s"],
            ["speed-up (ideal T/T')", f"{s['speedup']} x ({s['ideal_speedup']:.0f} x)"],
            [f"our DDIM loop, {loop['steps']} steps", f"{loop['ours_ms_per_step']} ms/step"],
            ["diffusers DDIMScheduler loop, same UNet", f"{loop['diffusers_ms_per_step']} ms/step"],
            ["the UNet alone", f"{loop['unet_ms_per_step']} ms/step"],
            ["loop overhead per step, ours / diffusers' (a network that costs nothing)",
             f"{loop['ours_overhead_us_per_step']} / {loop['diffusers_overhead_us_per_step']} us"],
            [f"distillation update (K = {tr['substeps']}, batch {tr['batch_size']})", f"{tr['distill_update_ms']} ms"],
            ["teacher training step, same batch", f"{tr['teacher_step_ms']} ms (one update costs "
                                                  f"{tr['distill_over_teacher_step']} teacher steps)"],
            *([f"`sfddm distill` on {n} process{'es' if n != '1' else ''} (torchrun), global batch "
               f"{tr['batch_size']}", f"{row['ms_per_update']} ms/update; eps differs from 1 process's by "
               f"{row['relative_difference']:.2g} (relative)"]
              for n, row in speed.get("data_parallel", {}).get("processes", {}).items()),
        ])
        lines += [""]
    checks = [[f"{target} (`{name}`)", measured, verdict] for name, quality in qualities.items()
              for target, measured, verdict in quality_targets(quality)]
    checks += [list(row) for row in speed_targets(speed)]
    checks += [list(row) for row in preemption_targets(preemption)]
    if checks:
        lines += ["## Targets", ""] + _table(["target", "measured", ""], checks) + [""]
    if serving:
        lines += serving_section(serving)
    return "\n".join(lines)


def plot(quality: dict, out_dir: Path, files: dict[str, str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants, baselines = quality["variants"], quality["baselines"]
    figure, axes = plt.subplots(figsize=(6, 4))
    ddim = sorted((b["nfe"], mean_sd(b)[0]) for name, b in baselines.items() if name.endswith(" trailing"))
    axes.plot(*zip(*ddim), "o--", color="gray", label="teacher DDIM (trailing)")
    axes.plot([baselines["teacher_ddpm"]["nfe"]], [mean_sd(baselines["teacher_ddpm"])[0]], "s", color="black",
              label="teacher DDPM")
    by_method = {}
    for name, v in variants.items():
        if name == "base" or name.startswith("steps=") or name in ("progressive", "progressive steps=10"):
            by_method.setdefault(v["method"], []).append((v["nfe"], mean_sd(v)[0]))
    for method, points in by_method.items():
        axes.plot(*zip(*sorted(points)), "o-", label=f"{method} student")
    axes.set(xscale="log", yscale="log", xlabel="network evaluations per image", ylabel="FID (mean over seed sets)")
    axes.legend()
    _save(figure, out_dir / files["nfe"])
    figure, panels = plt.subplots(1, 2, figsize=(12, 4.5))
    for axes, key in zip(panels, ("fid", "kid")):
        for name, v in variants.items():
            curve = v["curve"]
            style = "s--" if v["method"] == "progressive" else "o-"
            axes.plot([p["compute"] for p in curve], [p[key] for p in curve], style, markersize=3, label=name)
        axes.set(xscale="log", yscale="log" if key == "fid" else "symlog", xlabel="training compute (forward equivalents)",
                 ylabel=key.upper() + " (main seed set)")
    panels[0].legend(fontsize=6, ncol=2)
    _save(figure, out_dir / files["compute"])


def _save(figure, path: Path) -> None:
    import matplotlib.pyplot as plt
    with atomic_file(path, mode="wb") as handle:
        figure.savefig(handle, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)           # pyplot keeps every figure open until closed: each render makes two per sweep


def load_qualities(results: Path) -> dict[str, dict]:
    """quality-<name>.json of `results` as {name: sweep}: digits' profiles (fast, full) first, then the
    other datasets' sweeps."""
    files = sorted(results.glob("quality-*.json"), key=lambda path: (path.stem.count("-"), path.stem))
    return {path.stem[len("quality-"):]: _load(path) for path in files}


def load_attributions(results: Path) -> dict[str, dict]:
    """attribution.json (digits) and attribution-<dataset>.json of `results` as {file stem: attribution}."""
    files = sorted(results.glob("attribution*.json"), key=lambda path: (path.stem != "attribution", path.stem))
    return {path.stem: _load(path) for path in files}


def write(out_dir: Path) -> Path:
    """Render <out>/benchmark.md (and the plots) from the JSON in <out>/bench/: quality-*.json (digits'
    profiles first), attribution*.json, speed.json, preemption.json and serving.json, whichever exist."""
    results = out_dir / "bench"
    qualities = load_qualities(results)
    for name, quality in qualities.items():
        plot(quality, out_dir, plot_files(name))
    path = out_dir / "benchmark.md"
    speed, preemption, serving = (_load(results / f"{name}.json") for name in ("speed", "preemption", "serving"))
    atomic_write_text(path, render(qualities, speed, preemption, load_attributions(results), serving))
    return path


def results_section(benchmark_md: str, report_dir: str) -> str:
    """benchmark.md as a page's generated section: headings one level down, plot paths from the page."""
    body = benchmark_md.split("\n", 1)[1]                           # without its own title
    body = re.sub(r"^(#+) ", r"#\1 ", body, flags=re.MULTILINE)
    return re.sub(r"\]\((benchmark_[^)]+)\)", rf"]({report_dir}/\1)", body).strip()


def update_results_page(page: Path, benchmark_md: Path) -> None:
    """Replace the block between RESULTS_BEGIN and RESULTS_END of `page` with benchmark_md's section."""
    text = page.read_text()
    begin, end = text.find(RESULTS_BEGIN), text.find(RESULTS_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{page}: no {RESULTS_BEGIN} ... {RESULTS_END} block to fill")
    report_dir = Path(os.path.relpath(benchmark_md.resolve().parent, page.resolve().parent)).as_posix()
    section = results_section(benchmark_md.read_text(), report_dir)
    atomic_write_text(page, text[:begin + len(RESULTS_BEGIN)] + "\n" + section + "\n" + text[end:])
