"""`sfddm bench quality`: SFDDM against its baselines on one teacher.

Each variant of sweep() is the settings plus a few overrides (one question each), distilled from the
same teacher and data and sampled from the same seeds; FIDs use one feature network and sample count.
Baselines: the teacher's DDPM over T steps (the stored samples of sample-teacher) and its DDIM on each
variant's timesteps. Each variant's result is kept in <out>/bench/quality/ under the hash of its
settings, so an interrupted or extended sweep reruns only what is missing. Writes
<out>/bench/quality-<profile>.json (digits; quality-<profile>-<dataset>.json for another dataset, whose
chain datasets.py builds), from which report.py renders <out>/benchmark.md.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

import sfddm_core
from sfddm_core import config as config_lib
from sfddm_core import data, diffusion, distill, evaluate, fid, models, samplers
from sfddm_core.config import Config
from sfddm_core.errors import SfddmError
from sfddm_core.io import atomic_file, resolve_device, sha256_file, sha256_files, write_json
from sfddm_core.methods import METHODS, checked

from .common import machine
from .datasets import DEFAULT_DATASET, build_chain, dataset_overrides, result_name

# The questions asked of whichever method the settings name, one per variant: the settings plus these
# overrides. Each method adds its own (Method.variants), run with that method: sweep().
GENERAL_QUESTIONS: dict[str, dict] = {
    "base": {},
    "steps=2": {"student.steps": 2},
    "steps=8": {"student.steps": 8},
    "steps=10": {"student.steps": 10},
    "steps=20": {"student.steps": 20},
    "steps=50": {"student.steps": 50},
    "spacing=leading": {"student.spacing": "leading"},
    "init=random": {"student.init": "random"},
    "init=copy": {"student.init": "copy"},
    "sampler unclipped": {"student.clip_denoised": False},
    "lr constant": {"distill.lr_decay": "constant", "distill.warmup": 0},
    "lr=2e-4": {"distill.lr": 2e-4},
    "lr=5e-4": {"distill.lr": 5e-4},
    "lr=2e-3": {"distill.lr": 2e-3},
    "iterations=1900": {"distill.iterations": 1900},
}
# fast: minutes per variant on a 2-core CPU; full: the settings as they are (meant for a GPU).
PROFILES = {"fast": {"distill.iterations": 200, "distill.batch_size": 64}, "full": {}}
# The variants the full profile runs unless --variants says otherwise: those the targets and the defaults
# are decided on.
FULL_PROFILE_VARIANTS = ("base", "steps=2", "steps=10", "step_loss=eps", "lambda_h=1", "lr constant", "lr=5e-4",
                         "lr=2e-3", "inputs=teacher_path", "step_sampling=loss", "iterations=1900", "progressive",
                         "progressive step_loss=eps")
# The variants a dataset other than digits runs unless --variants says otherwise: the students the targets
# are judged on (T' = 2, 4, 8), progressive at T' = 4 for the compute axis, and the questions that decided
# the defaults on digits (learning rate, K, the loss, clipped teacher sub-steps), so that the defaults are
# measured on both.
DATASET_VARIANTS = ("base", "steps=2", "steps=8", "lr=5e-4", "lr=2e-3", "K=4", "clip_substeps", "step_loss=eps",
                    "progressive")
CURVE_POINTS = 4            # FID evaluations along each distillation (the last at its end)
RERUN_SEED_SETS = 4         # the final FIDs are measured on this many disjoint seed sets (the first: evaluate's)
RERUN_SEED_STRIDE = 1_000_000   # seed set k is evaluate.seed + k * stride + (0 .. num_samples - 1)
TRAINING_IMAGES = "training images, no model"   # the baseline row of real data: the metric's floor
BACKWARD_COST = 2           # a backward pass counted as two forward passes in training compute


def sweep() -> dict[str, dict]:
    """Variant name -> overrides: GENERAL_QUESTIONS, then each method's variants (Method.variants; None:
    one named after the method) with "distill.method" set to it. Composed at each call, so a method put
    in METHODS is in the sweep."""
    variants = dict(GENERAL_QUESTIONS)
    for method in METHODS.values():
        for name, overrides in (method.variants if method.variants is not None else {method.name: {}}).items():
            if name in variants:
                raise SfddmError(f"method {method.name!r}: variant name {name!r} is already in the sweep; "
                                 "expected a name of its own")
            variants[name] = {"distill.method": method.name, **overrides}
    return variants


def profile_variants(profile: str, dataset: str = DEFAULT_DATASET) -> list[str]:
    """The variants a profile runs unless --variants says otherwise. Digits, fast: every variant of the
    sweep (so a new method's are in it) but the long budget, whose 1900 updates are sized to progressive's
    full-profile compute; full: FULL_PROFILE_VARIANTS. Another dataset: DATASET_VARIANTS."""
    if dataset != DEFAULT_DATASET:
        return list(DATASET_VARIANTS)
    if profile == "fast":
        return [name for name in sweep() if name != "iterations=1900"]
    return list(FULL_PROFILE_VARIANTS)


def variant_config(cfg: Config, profile: str, overrides: dict) -> Config:
    variant = config_lib.with_overrides(config_lib.to_dict(cfg), {**PROFILES[profile], **overrides})
    checked(variant)
    return variant


def forward_equivalents(compute: dict, batch_size: int) -> int:
    """Training compute in network forward passes over one image: teacher forwards plus the student's
    forward and backward (BACKWARD_COST forwards) per image of each update."""
    return int(compute["teacher_forwards"]) + (1 + BACKWARD_COST) * compute["student_updates"] * batch_size


def compute_to_reach(curve: list[dict], target_fid: float) -> Optional[int]:
    """The training compute (forward equivalents) at the first curve point with FID <= target_fid."""
    return next((point["compute"] for point in curve if point["fid"] <= target_fid), None)


class QualityBench:
    """The shared pieces of a quality sweep: teacher, reference data, feature network, seeds, baselines.

    Besides the main seeds (evaluate.seed + k, those of `sfddm evaluate`), every final measurement is
    repeated on RERUN_SEED_SETS - 1 other, disjoint sets of seeds: the spread of those reruns is the
    noise of a number, which the report prints beside it and the targets are judged on the mean of.
    """

    def __init__(self, cfg: Config, teacher_dir: Path, data_dir: Path, classifier: Path, teacher_samples: Path,
                 store: Path):
        self.cfg, self.data_dir, self.store = cfg, data_dir, store
        self.device = resolve_device(cfg.device)
        self.teacher = models.load_model(teacher_dir)
        self.teacher_sha256 = teacher_identity(teacher_dir)
        self.reference, _ = data.load_split(data_dir, "test")
        self.network = fid.feature_network(cfg.evaluate, classifier)
        n = cfg.evaluate.num_samples
        self.seed_sets = [evaluate.seeds(cfg, n) + k * RERUN_SEED_STRIDE for k in range(RERUN_SEED_SETS)]
        self.ddpm = evaluate.load_samples(teacher_samples / evaluate.SAMPLE_FILES["teacher_ddpm"])
        self.ddim_full = evaluate.load_samples(teacher_samples / evaluate.SAMPLE_FILES["teacher_ddim_full"])
        if len(self.ddpm["images"]) != n:
            raise SfddmError(f"{teacher_samples}: holds {len(self.ddpm['images'])} samples, evaluate.num_samples "
                             f"is {n}; rerun sfddm sample-teacher")

    def sample(self, model: models.DiffusionModel, timesteps=None, seed_set: int = 0,
               sampler: Union[str, samplers.Sampler] = "ddim", part: slice = slice(None)) -> np.ndarray:
        """Images of `sampler` (a name in samplers.SAMPLER_FUNCTIONS or a method's Sampler) from a seed set
        (the seeds of `part` of it: each image has its own, so a part's images are those of the whole)."""
        steps = len(timesteps) if timesteps is not None else model.num_timesteps
        name = sampler if isinstance(sampler, str) else sampler.__name__
        images, _ = samplers.generate(model, self.seed_sets[seed_set][part], sampler, timesteps, self.cfg.evaluate.batch_size,
                                      self.device, desc=f"{name}, {steps} steps, seed set {seed_set}",
                                      precision=self.cfg.precision, channels_last=self.cfg.channels_last)
        return data.to_uint8(images)

    def distances(self, images: np.ndarray) -> dict[str, float]:
        """FID, KID and KID's std over subsets against the test split (fid.image_distances)."""
        d = fid.image_distances(self.network, self.reference, {"images": images},
                                batch_size=self.cfg.evaluate.batch_size, device=self.device)["images"]
        return {"fid": round(d["fid"], 4), "kid": round(d["kid"], 6), "kid_std": round(d["kid_std"], 6)}

    def with_reruns(self, images_of_seed_set: Callable[[int], np.ndarray]) -> dict:
        """distances() on the main seeds, plus "reruns": those of every seed set (the main one first)."""
        reruns = [self.distances(images_of_seed_set(k)) for k in range(RERUN_SEED_SETS)]
        return {**reruns[0], "reruns": reruns}

    def ddpm_images(self, seed_set: int) -> np.ndarray:
        """The teacher's T-step DDPM samples: the stored ones for the main seeds, others kept_images."""
        if seed_set == 0:
            return self.ddpm["images"]
        return self.kept_images("teacher_ddpm", seed_set,
                                lambda part: self.sample(self.teacher, None, seed_set, "ddpm", part))

    def kept_images(self, name: str, seed_set: int, sample_part: Callable[[slice], np.ndarray]) -> np.ndarray:
        """A teacher sampler's images of a seed set (sample_part: those of a part of it), made once and kept
        in the store as <name>-<teacher>-<first seed>-<count>.npz: `name` says the sampler and its
        timesteps; the samplers' numbers are pinned by tests/test_golden.py, and the sampling precision
        (precision:, fp32 unless set) is not in the name. The teacher's DDPM costs T network evaluations
        per image (40 to 60 min per seed set of 32 x 32 on 2 cores), so every sampler's set is made a
        batch at a time, each batch kept until the set is whole: an interrupted run resumes from its last
        whole batch, with the images an uninterrupted one makes."""
        seeds, batch = self.seed_sets[seed_set], self.cfg.evaluate.batch_size
        path = self.store / f"{name}-{self.teacher_sha256[:16]}-{seeds[0]}-{len(seeds)}.npz"
        if not path.is_file():
            starts = range(0, len(seeds), batch)
            batches = [path.with_suffix(f".{start}.npz") for start in starts]
            for start, batch_path in zip(starts, batches):
                if not batch_path.is_file():
                    images = sample_part(slice(start, start + batch))     # before the file is opened
                    with atomic_file(batch_path, "wb") as handle:
                        np.savez(handle, images=images)
            images = np.concatenate([np.load(batch_path)["images"] for batch_path in batches])
            with atomic_file(path, "wb") as handle:
                np.savez(handle, images=images)
            for batch_path in batches:
                batch_path.unlink()
        with np.load(path) as stored:
            return stored["images"]

    def kept_ddim(self, kind: str, model: models.DiffusionModel, timesteps: np.ndarray) -> dict:
        """with_reruns of `model`'s DDIM on `timesteps`, its images kept as <kind>-<timesteps>-... (kept_images)."""
        def images(k: int) -> np.ndarray:
            return self.kept_images(f"{kind}-{timesteps_digest(timesteps)}", k,
                                    lambda part: self.sample(model, timesteps, k, "ddim", part))
        return self.with_reruns(images)

    def baselines(self, variants: dict[str, dict]) -> dict:
        """Training images (no model: the metric's floor), the teacher's DDPM over T steps, its DDIM on
        the timesteps of each variant, and, for each SFDDM variant with a trajectory term, the teacher's
        unclipped DDIM along the path its targets take (K sub-steps per student step): the sampler a
        perfect student would copy."""
        train, _ = data.load_split(self.data_dir, "train")
        rows = {TRAINING_IMAGES: {"nfe": 0, **self.with_reruns(lambda k: training_images(train, self.seed_sets[k]))},
                "teacher_ddpm": {"nfe": self.teacher.num_timesteps, **self.with_reruns(self.ddpm_images)}}
        for variant in variants.values():
            name = ddim_baseline_name(variant)
            if name not in rows:
                rows[name] = {"nfe": variant["nfe"], "phi": variant["phi"],
                              **self.kept_ddim("teacher_ddim", self.teacher, np.asarray(variant["phi"]))}
            path = METHODS[variant["method"]].target_timesteps(variant["settings"])
            if path is not None:
                name = f"teacher ODE {len(path)} (K = {variant['settings']['distill']['substeps']} path)"
                if name not in rows:
                    ode = models.DiffusionModel(self.teacher.unet, self.teacher.alphas_cumprod, clip_denoised=False)
                    rows[name] = {"nfe": len(path), **self.kept_ddim("teacher_ode", ode, path)}
        return rows

    def run_variant(self, cfg: Config) -> dict:
        """Distil one student, with an FID curve along the way; FID (with reruns), consistency and
        compute at the end."""
        schedule = diffusion.StudentSchedule(cfg.student_timesteps, self.teacher.alphas_cumprod)
        dc, sampler = cfg.distill, METHODS[cfg.distill.method].sampler
        updates_per_curve = max(1, dc.iterations // CURVE_POINTS)

        def student(unet) -> models.DiffusionModel:
            return models.DiffusionModel(unet, schedule.abar_student, cfg.student.clip_denoised)

        def student_distances(unet, updates) -> dict:
            return self.distances(self.sample(student(unet), None, 0, sampler))

        unet, _, log = distill.distill(cfg, self.teacher, self.data_dir, student_distances, updates_per_curve)
        compute = distill.training_compute(log)
        curve = [{"updates": entry["step"] + 1, "fid": entry["fid"], "kid": entry["kid"],
                  "kid_std": entry["kid_std"], "seconds": entry["seconds"],
                  "compute": forward_equivalents({"teacher_forwards": entry["teacher_forwards"],
                                                  "student_updates": entry["step"] + 1}, dc.batch_size)}
                 for entry in log if "fid" in entry]
        images = self.sample(student(unet), None, 0, sampler)
        consistency = evaluate.consistency_ratio(self.ddim_full["images"], images[:len(self.ddim_full["images"])])
        final = self.with_reruns(lambda k: images if k == 0 else self.sample(student(unet), None, k, sampler))
        return {**final, "consistency_ratio": round(consistency, 4), "nfe": len(schedule.phi),
                "phi": schedule.phi.tolist(), "compute": {**compute, "forward_equivalents": curve[-1]["compute"]},
                "curve": curve}


def training_images(train: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """As many images of the train split as there are seeds, drawn without replacement by a generator
    seeded by the first: data scored as a model's samples are, so the FID a perfect model would get at
    this sample count (the seed sets' draws overlap where the split is smaller than all of them)."""
    rng = np.random.default_rng(int(seeds[0]))
    return train[rng.choice(len(train), size=min(len(seeds), len(train)), replace=False)]


def timesteps_digest(timesteps) -> str:
    """A short name for a list of teacher timesteps (a sampler's path), for file names."""
    return hashlib.sha256(np.asarray(timesteps, dtype=np.int64).tobytes()).hexdigest()[:12]


def teacher_identity(teacher_dir: Path) -> str:
    """sha256 over the files that decide what the teacher computes: its UNet (weights, architecture) and
    its scheduler. Not its provenance files (sfddm.json, the resolved config saved beside it), which
    change with settings the teacher does not depend on."""
    digest = hashlib.sha256()
    for name, file_digest in sha256_files(teacher_dir).items():
        if name.startswith(("unet/", "scheduler/")):
            digest.update(name.encode() + b"\0" + file_digest.encode())
    return digest.hexdigest()


def ddim_baseline_name(variant: dict) -> str:
    """The baseline a variant is compared with: the teacher's DDIM on the same timesteps."""
    return f"teacher_ddim {variant['nfe']} {variant['settings']['student']['spacing']}"


def settings_hash(cfg: Config, teacher_sha256: str) -> str:
    """What a stored variant result depends on: its settings, the teacher (teacher_identity), and the library's code (all
    of sfddm_core but the stage wrappers), so a library change reruns the sweep and a benchmark change does not."""
    library = Path(sfddm_core.__file__).parent
    code = {str(path.relative_to(library)): sha256_file(path) for path in sorted(library.rglob("*.py"))
            if path.name != "stages.py"}
    text = json.dumps({"config": config_lib.to_dict(cfg), "teacher": teacher_sha256, "code": code}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def quality(cfg: Config, teacher_dir: Path, data_dir: Path, classifier: Path, teacher_samples: Path,
            out_dir: Path, profile: str = "fast", variants: Optional[list[str]] = None,
            dataset: str = DEFAULT_DATASET, settings_overrides: Optional[dict] = None,
            run_name: Optional[str] = None) -> dict:
    """sfddm bench quality: run the sweep (reusing stored variant results), write
    <out>/bench/quality-<result_name>.json. On digits the chain is the one given (make run's); on another
    dataset (datasets.DATASETS or folder:PATH) it is built first, or reused, under the store, with `cfg`:
    the settings with that dataset's overrides beneath the user's (as `sfddm bench quality` loads them).
    settings_overrides: the user's (--set), recorded so that the report says what the sweep ran with;
    run_name: --name, which names the results (datasets.result_name)."""
    questions = sweep()
    unknown = sorted(set(variants or []) - set(questions))
    if unknown:
        raise SfddmError(f"--variants: unknown {unknown}; expected names from {list(questions)}")
    store = out_dir / "bench" / "quality"
    store.mkdir(parents=True, exist_ok=True)
    if dataset != DEFAULT_DATASET:
        teacher_dir, data_dir, classifier, teacher_samples = build_chain(cfg, dataset, store)
    bench = QualityBench(cfg, teacher_dir, data_dir, classifier, teacher_samples, store)
    chosen = variants or profile_variants(profile, dataset)
    configs = {name: variant_config(cfg, profile, overrides) for name, overrides in questions.items()
               if name in chosen}
    results = {}
    for name, variant in configs.items():
        path = store / f"{settings_hash(variant, bench.teacher_sha256)}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
            continue
        print(f"bench quality: {name}", flush=True)
        result = {"variant": name, "overrides": questions[name], "method": variant.distill.method,
                  "settings": config_lib.to_dict(variant), **bench.run_variant(variant)}
        write_json(path, result)
        results[name] = result
    report = {"profile": profile, "dataset": dataset, "name": run_name, "dataset_overrides": dataset_overrides(dataset),
              "settings_overrides": settings_overrides or {}, "overrides": PROFILES[profile],
              "machine": machine(bench.device),
              "feature_network": bench.network.label, "num_samples": cfg.evaluate.num_samples,
              "rerun_seed_sets": RERUN_SEED_SETS,
              "teacher_sha256": bench.teacher_sha256, "baselines": bench.baselines(results),
              "variants": results}
    write_json(out_dir / "bench" / f"quality-{result_name(profile, dataset, run_name)}.json", report)
    return report
