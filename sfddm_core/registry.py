"""The MLflow model registry: register a distilled student, promote it to champion by its stored FID.

Every version carries its evidence as tags, set when the version is created (VERSION_TAGS):
    fid.student, fid.teacher_ddim, fid.teacher_ddpm   FIDs from metrics/evaluate.json
    kid.*, kid_std.*                                  KIDs (unbiased) and their spread, same three
    feature_network, num_samples                      what the FIDs were measured with
    T, T_student, spacing                             teacher steps, student steps T', step map
    teacher_sha256, data_sha256, student_sha256       provenance hashes
    git_commit                                        HEAD at registration ("unknown" outside git)
Aliases: `challenger` is the latest registered student, `champion` the one to serve
(models:/<name>@champion). Promotion reads FIDs only from these tags, never from the command line.

Promotion needs neither torch nor diffusers, so only registration imports them (io, models).

MLflow has no transactions, so promotion is compare-and-set by convention: a promoter stamps its
version with sfddm.promoted_at, moves the alias, then re-reads the registry and hands the alias to a
better version promoted concurrently (or takes it back from a worse one) until the registry agrees.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Optional, Union
from urllib.parse import unquote

from . import tracking
from .errors import SfddmError

DEFAULT_MODEL_NAME = "sfddm-student"
CHALLENGER, CHAMPION = "challenger", "champion"
FID_KEYS = ("student", "teacher_ddim", "teacher_ddpm")
DISTANCES = ("fid", "kid", "kid_std")                       # metrics/evaluate.json's sections, each over FID_KEYS
FID_TAG = "fid.student"
COMPARABILITY_TAGS = ("feature_network", "num_samples")     # FIDs compare only when these agree
VERSION_TAGS = (*(f"{d}.{key}" for d in DISTANCES for key in FID_KEYS), *COMPARABILITY_TAGS, "T", "T_student", "spacing",
                "teacher_sha256", "data_sha256", "student_sha256", "git_commit")
METRICS_HASH_TAG = "sfddm.metrics_sha256"   # with student_sha256, identifies a registration
PROMOTED_AT_TAG = "sfddm.promoted_at"       # ms since the epoch when the version took the champion alias
FORCED_REASON_TAG = "sfddm.forced_reason"
RACE_WINDOW_MS = 5 * 60 * 1000              # promotions this close count as concurrent; promote takes seconds
SETTLE_ROUNDS = 5
UPSERT_ATTEMPTS = 3
SERVING_CODE = Path(__file__).with_name("serving.py")
SERVING_REQUIREMENTS = ("mlflow", "torch", "diffusers", "numpy", "pandas", "pyyaml", "tqdm")

PathLike = Union[str, Path]


@dataclass(frozen=True)
class Registration:
    model_name: str
    version: int
    created: bool       # False: this student with these metrics was registered before, as `version`

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """The outcome of a promotion request; a refusal says why in `reason`."""
    promoted: bool
    reason: str
    old_version: Optional[int]          # the champion before the request (None: there was none)
    new_version: int                    # the candidate
    champion_version: Optional[int]     # the champion after the request

    def to_dict(self) -> dict:
        return asdict(self)


# ---- registration ----

def register(student_dir: PathLike, metrics_path: PathLike, data_dir: PathLike,
             model_name: str = DEFAULT_MODEL_NAME, run_id: Optional[str] = None) -> Registration:
    """Register a student folder as an MLflow pyfunc model version and point `challenger` at it.

    The version is tagged with its FIDs and provenance (VERSION_TAGS). Registering the same student
    (same student_sha256) with the same metrics again creates nothing: the existing version is found
    by its tags, and `challenger` is moved back to it. The model is logged into run_id (the stage's
    run), or a run of its own.
    """
    import mlflow
    student_dir = Path(student_dir)
    tags = version_tags(student_dir, metrics_path, data_dir)
    client, _ = tracking.connect()
    with tracking.mlflow_errors(f"registering {student_dir} as {model_name}"):
        existing = _find_registration(client, model_name, tags)
        if existing is None:
            # Only a new version loads the model (torch and diffusers take seconds to import): a rerun
            # of an unchanged pipeline, which `dvc repro` always runs, stays quick.
            from . import models
            image_shape = models.load_model(student_dir).image_shape     # also checks the folder loads
            metrics = read_metrics(metrics_path)
            model_uri = log_student_model(student_dir, image_shape, metrics, model_name, run_id).model_uri
            # Tags go in with the version, so no reader (promote) ever sees it untagged.
            version = int(mlflow.register_model(model_uri, model_name, tags=tags).version)
            client.update_model_version(model_name, version, description=version_description(tags))
        else:
            version = int(existing.version)
        _set_alias(client, model_name, CHALLENGER, version)
    return Registration(model_name, version, created=existing is None)


def version_tags(student_dir: PathLike, metrics_path: PathLike, data_dir: PathLike) -> dict[str, str]:
    """The tags of a registration (VERSION_TAGS and METRICS_HASH_TAG), from the student's sfddm.json,
    the evaluate metrics file and the prepared data's meta.json."""
    from . import io
    provenance = io.student_provenance(student_dir)
    metrics = read_metrics(metrics_path)
    data_meta = Path(data_dir) / "meta.json"
    if not data_meta.is_file():
        raise SfddmError(f"{data_meta}: not found; expected the prepared data (run sfddm prepare)")
    try:
        spacing = provenance["spacing"]
        tags = {"T": provenance["teacher_timesteps"], "T_student": provenance["student_steps"],
                "spacing": spacing if isinstance(spacing, str) else json.dumps(spacing),
                "teacher_sha256": provenance["teacher_sha256"]}
    except KeyError as err:
        raise SfddmError(f"{Path(student_dir) / 'sfddm.json'}: missing key {err}; rerun sfddm distill") from None
    tags.update({f"{d}.{key}": metrics[d][key] for d in DISTANCES for key in FID_KEYS})
    tags.update({key: metrics[key] for key in COMPARABILITY_TAGS})
    tags.update(data_sha256=io.sha256_file(data_meta), student_sha256=io.sha256_tree(student_dir),
                git_commit=tracking.git_commit())
    tags[METRICS_HASH_TAG] = hashlib.sha256(json.dumps(metrics, sort_keys=True).encode()).hexdigest()
    return {key: str(value) for key, value in tags.items()}


def read_metrics(path: PathLike) -> dict:
    """evaluate.json, checked for the entries registration and promotion rely on."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        raise SfddmError(f"{path}: not found; run sfddm evaluate first") from None
    except ValueError as err:
        raise SfddmError(f"{path}: not valid JSON ({err})") from None
    for d in DISTANCES:
        values = metrics.get(d) if isinstance(metrics, dict) else None
        if not isinstance(values, dict) or not all(isinstance(values.get(key), (int, float)) for key in FID_KEYS):
            raise SfddmError(f"{path}: expected numbers {d}.{f', {d}.'.join(FID_KEYS)}; rerun sfddm evaluate")
    if not isinstance(metrics.get("feature_network"), str) or not isinstance(metrics.get("num_samples"), int):
        raise SfddmError(f"{path}: expected feature_network (text) and num_samples (integer)")
    return metrics


def version_description(tags: dict[str, str]) -> str:
    """The registry's one-paragraph summary of a version, from its tags."""
    return (f"{tags['T_student']}-step student of a {tags['T']}-step teacher ({tags['spacing']} spacing). "
            f"FID {float(tags['fid.student']):.2f} against {float(tags['fid.teacher_ddpm']):.2f} for the teacher's "
            f"{tags['T']}-step DDPM and {float(tags['fid.teacher_ddim']):.2f} for its {tags['T_student']}-step DDIM; "
            f"KID {float(tags['kid.student']):.4g} ± {float(tags['kid_std.student']):.3g} "
            f"(teacher DDPM {float(tags['kid.teacher_ddpm']):.4g}); {tags['num_samples']} samples, features of "
            f"{tags['feature_network']}. Code {tags['git_commit'][:12]}. The model card is the artifact "
            "student/README.md.")


def log_student_model(student_dir: Path, image_shape: tuple[int, int, int], metrics: dict, model_name: str,
                      run_id: Optional[str] = None):
    """Log the student as a pyfunc model-from-code (sfddm_core/serving.py, no pickles) into run_id (None:
    a run of its own) and return its ModelInfo.

    The diffusers folder is the artifact "student", its model card completed with the measured FID and
    KID. A copy of sfddm_core travels with the model (code_paths), so loading it needs the pinned
    requirements but not this project installed. The input example (two requests: two images from
    seed 0, one from seed 2) is run once by MLflow when logging, which checks that the logged model
    loads and predicts, and shows callers a batch of requests.
    """
    import pandas as pd
    from mlflow import pyfunc
    from mlflow.models import Model

    from . import io, models
    with tempfile.TemporaryDirectory() as tmp:
        student = Path(tmp) / "student"
        shutil.copytree(student_dir, student)
        provenance = {key: value for key, value in io.student_provenance(student).items() if key != "files"}
        io.atomic_write_text(student / models.CARD, models.model_card(provenance, metrics, model_name))
        models.write_manifest(student, provenance)          # the card changed: hash the files again
        package = Path(tmp) / "sfddm_core"
        shutil.copytree(SERVING_CODE.parent, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return Model.log(artifact_path=None, name="student", flavor=pyfunc, run_id=run_id,
                         python_model=str(SERVING_CODE), artifacts={"student": str(student)},
                         code_paths=[str(package)], signature=serving_signature(image_shape),
                         input_example=pd.DataFrame({"num_images": [2, 1], "seed": [0, 2]}),
                         pip_requirements=serving_requirements())


def serving_signature(image_shape: tuple[int, int, int]):
    """Input columns num_images, seed (long) and optional num_inference_steps (long), a request per row;
    output uint8 images (the rows' num_images summed, H, W, C), ready for PIL, a quarter of the size of
    float32 (serving.py)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    channels, height, width = image_shape
    inputs = Schema([ColSpec("long", "num_images"), ColSpec("long", "seed"),
                     ColSpec("long", "num_inference_steps", required=False)])
    return ModelSignature(inputs, Schema([TensorSpec(np.dtype(np.uint8), (-1, height, width, channels))]))


def serving_requirements() -> list[str]:
    """The packages serving.py needs, pinned to the versions installed here; local version labels
    (+cpu, +cu124) are dropped so the pins hold on CPU and GPU machines alike."""
    return [f"{name}=={installed_version(name).split('+')[0]}" for name in SERVING_REQUIREMENTS]


def _find_registration(client, model_name: str, tags: dict):
    """The version registered from the same student files and the same metrics, if any."""
    found = client.search_model_versions(f"name = '{model_name}' and "
                                         f"tags.student_sha256 = '{tags['student_sha256']}'")
    same = [mv for mv in found if mv.tags.get(METRICS_HASH_TAG) == tags[METRICS_HASH_TAG]]
    return min(same, key=lambda mv: int(mv.version)) if same else None


# ---- promotion ----

def promote(model_name: str, max_fid: float, version: Optional[int] = None, force: bool = False,
            reason: Optional[str] = None) -> Decision:
    """Move `champion` to `version` (default: the challenger) if its stored FID passes the gates.

    Gates: fid.student <= max_fid, and strictly lower than the champion's fid.student measured the
    same way (same feature_network and num_samples); with no champion only max_fid applies. A
    refusal is a Decision with promoted=False. force=True with a reason skips the gates and records
    the reason as the version's sfddm.forced_reason tag.

    Raises SfddmError, leaving the registry unchanged, for an unreachable server, an unknown model
    or version, a missing challenger (never set, or its version deleted), or a version without FID tags.
    """
    if force and not (reason and reason.strip()):
        raise SfddmError("a forced promotion needs a reason (--reason TEXT); it is recorded on the version")
    client, _ = tracking.connect()
    with tracking.mlflow_errors(f"promoting {model_name}"):
        started = _now_ms()
        candidate = _candidate(client, model_name, version)
        fid = _stored_fid(candidate)
        champion = _alias_version(client, model_name, CHAMPION)
        old = int(champion.version) if champion else None
        if old == int(candidate.version):
            return Decision(True, f"version {old} is already the champion", old, old, old)
        refusal = _gate_refusal(candidate, champion, max_fid)
        if refusal and not force:
            return Decision(False, refusal, old, int(candidate.version), old)
        if force:
            _set_tag(client, model_name, candidate.version, FORCED_REASON_TAG, reason.strip())
            why = f"forced ({reason.strip()})" + (f"; overriding: {refusal}" if refusal else "")
        else:
            why = f"FID {fid:g} <= max_fid {max_fid:g} and " + (
                f"lower than champion version {old}'s {_stored_fid(champion):g}" if champion else "no champion yet")
        return _take_champion(client, candidate, champion, started, why, forced=force)


def promote_gate(model_name: str, max_fid: float, out_path: PathLike, version: Optional[int] = None,
                 force: bool = False, reason: Optional[str] = None) -> Decision:
    """promote() for `dvc repro`: the decision, refusal included, is written to out_path as
    {"promoted", "reason", "champion_version", "candidate_version"} (champion_version null while the
    model has no champion). Raises SfddmError only for real errors, never for a refusal."""
    from . import io
    decision = promote(model_name, max_fid, version, force, reason)
    io.write_json(out_path, {"promoted": decision.promoted, "reason": decision.reason,
                             "champion_version": decision.champion_version,
                             "candidate_version": decision.new_version})
    return decision


def _gate_refusal(candidate, champion, max_fid: float) -> Optional[str]:
    """Why the candidate may not replace the champion, or None when it may."""
    name, fid = f"version {candidate.version}", _stored_fid(candidate)
    if fid > max_fid:
        return f"{name}: FID {fid:g} exceeds max_fid {max_fid:g}"
    if champion is None:
        return None
    if FID_TAG not in champion.tags:
        return f"champion version {champion.version} has no {FID_TAG} tag to compare with; use --force --reason"
    if not _comparable(candidate, champion):
        return (f"{name}'s FID ({_measured_with(candidate)}) is not comparable with champion version "
                f"{champion.version}'s ({_measured_with(champion)}); use --force --reason to promote anyway")
    if fid >= _stored_fid(champion):
        return (f"{name}: FID {fid:g} is not lower than champion version {champion.version}'s "
                f"{_stored_fid(champion):g}")
    return None


def _take_champion(client, candidate, observed, started: int, why: str, forced: bool) -> Decision:
    """Set the champion alias, then settle races with concurrent promoters (see the module doc).

    A version stamped sfddm.promoted_at after the champion we compared against is a concurrent
    promotion; among those the lowest comparable FID keeps the alias and a forced one wins outright.
    A promoter that loses removes its stamp and reports a refusal naming the winner.
    """
    name, mine = candidate.name, int(candidate.version)
    old = int(observed.version) if observed else None
    _set_tag(client, name, mine, PROMOTED_AT_TAG, str(_now_ms()))
    _set_alias(client, name, CHAMPION, mine)
    if forced:
        return Decision(True, why, old, mine, mine)
    since = max(_promoted_at(observed) if observed else 0, started - RACE_WINDOW_MS)
    fid = _stored_fid(candidate)
    for _ in range(SETTLE_ROUNDS):
        current = _alias_version(client, name, CHAMPION)
        if current is not None and int(current.version) == mine:
            winner = _best_rival(client, candidate, since)
            if winner is None:
                return Decision(True, why, old, mine, mine)
            _set_alias(client, name, CHAMPION, winner.version)
            return _lost(client, candidate, old, winner, "was promoted concurrently and wins")
        if current is None or FORCED_REASON_TAG in current.tags or not _comparable(candidate, current) \
                or _stored_fid(current) <= fid:
            return _lost(client, candidate, old, current, "took the champion alias concurrently")
        # A worse concurrent promotion overwrote ours: take the alias back and check again.
        _set_alias(client, name, CHAMPION, mine)
    raise SfddmError(f"{name}: the champion alias kept changing under concurrent promotions; retry")


def _best_rival(client, candidate, since: int):
    """The concurrent promotion (stamped after `since`) that should hold the alias instead of the
    candidate: the latest forced one, else the lowest comparable FID below the candidate's."""
    rivals = [mv for mv in client.search_model_versions(f"name = '{candidate.name}'")
              if int(mv.version) != int(candidate.version) and _promoted_at(mv) > since]
    forced = [mv for mv in rivals if FORCED_REASON_TAG in mv.tags]
    if forced:
        return max(forced, key=_promoted_at)
    better = [mv for mv in rivals if _comparable(candidate, mv) and FID_TAG in mv.tags
              and _stored_fid(mv) < _stored_fid(candidate)]
    return min(better, key=_stored_fid) if better else None


def _lost(client, candidate, old: Optional[int], winner, how: str) -> Decision:
    client.delete_model_version_tag(candidate.name, candidate.version, PROMOTED_AT_TAG)
    if winner is None:
        return Decision(False, "the champion alias was removed concurrently", old, int(candidate.version), None)
    fid = winner.tags.get(FID_TAG, "unknown")
    return Decision(False, f"version {winner.version} (FID {fid}) {how}", old, int(candidate.version),
                    int(winner.version))


def _set_alias(client, model_name: str, alias: str, version) -> None:
    _upsert(client.set_registered_model_alias, model_name, alias, version)


def _set_tag(client, model_name: str, version, key: str, value: str) -> None:
    _upsert(client.set_model_version_tag, model_name, version, key, value)


def _upsert(write, *args) -> None:
    """An alias or tag write, retried: MLflow's SQL store upserts with a read then an insert, so two
    processes writing the same key at once can collide (BAD_REQUEST, a unique-key violation); on the
    retry the row exists and is updated."""
    from mlflow.exceptions import MlflowException
    for attempt in range(1, UPSERT_ATTEMPTS + 1):
        try:
            return write(*args)
        except MlflowException as err:
            if err.error_code != "BAD_REQUEST" or attempt == UPSERT_ATTEMPTS:
                raise
            time.sleep(0.1 * attempt)


# ---- serving ----

def champion_uri(model_name: str) -> str:
    return f"models:/{model_name}@{CHAMPION}"


def check_servable(model_uri: str) -> None:
    """One line (SfddmError) before a scoring server starts on a models:/NAME@ALIAS URI that names no
    version: no database at a sqlite tracking URI (MLflow would create an empty one), no such model, no
    such alias. Other URIs are left to MLflow."""
    alias_uri = re.fullmatch(r"models:/([^/@]+)@([^/@]+)", model_uri)
    if alias_uri is None:
        return
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(unquote(uri[len("sqlite:///"):])).is_file():
        raise SfddmError(f"{uri}: no MLflow database there; register a student first (sfddm register, "
                         "make run) or set MLFLOW_TRACKING_URI")
    client = tracking.fast_failing_client()
    name, alias = alias_uri.groups()
    with tracking.mlflow_errors(f"looking up {model_uri}"):
        if _alias_version(client, name, alias) is None:
            raise SfddmError(f"{name} has no @{alias} version; promote one first (sfddm promote)")


# ---- registry look-ups (each a one-line SfddmError when the thing is missing) ----

def _candidate(client, model_name: str, version: Optional[int]):
    if version is not None:
        return _version(client, model_name, version)
    challenger = _alias_version(client, model_name, CHALLENGER)
    if challenger is None:
        raise SfddmError(f"{model_name} has no @{CHALLENGER} version (never registered, or its version was "
                         "deleted); run sfddm register or pass --version")
    return challenger


def _alias_version(client, model_name: str, alias: str):
    """The version an alias points at, or None. (MLflow drops an alias when its version is deleted.)"""
    aliases = _registered_model(client, model_name).aliases
    return _version(client, model_name, aliases[alias]) if alias in aliases else None


def _registered_model(client, model_name: str):
    from mlflow.exceptions import MlflowException
    try:
        return client.get_registered_model(model_name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise SfddmError(f"no registered model named {model_name!r}; run sfddm register first") from None
        raise


def _version(client, model_name: str, version):
    from mlflow.exceptions import MlflowException
    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            _registered_model(client, model_name)       # a missing model gets its own message
            raise SfddmError(f"{model_name} has no version {version}") from None
        raise


def _stored_fid(model_version) -> float:
    try:
        return float(model_version.tags[FID_TAG])
    except (KeyError, ValueError):
        raise SfddmError(f"{model_version.name} version {model_version.version} has no valid {FID_TAG} "
                         "tag; only versions made by sfddm register can be promoted") from None


def _comparable(a, b) -> bool:
    return all(a.tags.get(key) == b.tags.get(key) for key in COMPARABILITY_TAGS)


def _measured_with(model_version) -> str:
    return ", ".join(f"{key}={model_version.tags.get(key)}" for key in COMPARABILITY_TAGS)


def _promoted_at(model_version) -> int:
    return int(model_version.tags.get(PROMOTED_AT_TAG, 0))


def _now_ms() -> int:
    return int(time.time() * 1000)
