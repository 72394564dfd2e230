"""The one typed config: loaded from params.yaml, validated once here, written next to every output.

Every key is declared below with its type and default; an unknown key, a wrong type or a value out of
range raises ConfigError naming the dotted key and what was expected. Nothing downstream re-validates.
A leaf: it knows no distillation method. `distill.method` is a plain name here, and `methods` holds each
method's own settings as plain data (methods.<name>: a mapping of keys to values, typed by nothing here).
The table of methods (methods/__init__.py `checked`) checks the name, and each method types and checks
its own section (Method.settings, through `section` below), where settings enter a command that distils,
so editing a method reruns only the stages that distil.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from . import diffusion
from .errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    source: str = "digits"              # digits | photos | cifar10 | folder
    path: Optional[str] = None          # cifar10: folder holding cifar-10-batches-py; folder: image tree
    download: bool = False              # cifar10: let torchvision download it where the network allows
    image_size: int = 8
    channels: int = 1                   # 1 (grayscale) or 3 (RGB); digits is 1, cifar10 is 3
    test_fraction: float = 0.25         # digits and folder; cifar10 keeps its official test batch
    max_images: Optional[int] = None    # cap on the images read (per split for cifar10); photos: crops (null: 6000)


@dataclass(frozen=True)
class UNetConfig:
    block_out_channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    attention: tuple[bool, ...] = (False, True)     # self-attention in each resolution level
    norm_num_groups: int = 8


@dataclass(frozen=True)
class TeacherConfig:
    source: str = "train"               # train | pretrained
    uri: Optional[str] = None           # pretrained: local folder, s3://bucket/prefix, or a hub id
    s3_endpoint_url: Optional[str] = None   # S3-compatible store; else AWS_ENDPOINT_URL from the env
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    unet: UNetConfig = field(default_factory=UNetConfig)
    lr: float = 1e-3
    batch_size: int = 128
    iterations: int = 2500
    ema_decay: float = 0.999
    checkpoint_every: Optional[int] = None  # save the training state every N updates (null: 10 times a run; 0: off)
    checkpoint_seconds: float = 180.0   # ... and whenever this long has passed since the last save (0: not by time)
    grad_clip: Optional[float] = None   # clip the gradient norm to this (null: off)


@dataclass(frozen=True)
class StudentConfig:
    steps: int = 4
    spacing: Union[str, tuple[int, ...]] = "trailing"   # leading | trailing | explicit teacher steps
    init: str = "teacher"               # teacher | random | copy (teacher weights, time embedding as is)
    clip_denoised: bool = True          # the student's DDIM clips x0-hat at every step (else at the end only)


@dataclass(frozen=True)
class DistillConfig:
    method: str = "sfddm"               # sfddm | progressive (Salimans & Ho 2022, for comparison)
    loss: str = "l2"                    # l1 | l2: distance of the pointwise output and feature terms
    pointwise_weight: float = 0.0       # |eps_S(x', i) - eps_T(x', phi_i)|
    hidden_weight: float = 0.0          # lambda_h: |h_S - h_T|, h = input of conv_out
    trajectory_weight: float = 1.0      # a student step against eps*, from K teacher DDIM sub-steps
    step_loss: str = "sampler_output"   # sampler_output: where the steps land as sampled | eps: |eps_S - eps*|^2
    substeps: int = 8                   # K
    clip_substeps: bool = False         # clip the teacher's x0-hat at its sub-steps (all but the last)
    inputs: str = "forward_process"     # forward_process: x' ~ q(x | x0) | teacher_path: the teacher's DDIM states
    step_sampling: str = "uniform"      # uniform | loss: student steps drawn by sqrt of their running loss
    lr: float = 1e-3
    warmup: int = 30                    # updates of linear learning-rate warm-up
    lr_decay: str = "cosine"            # constant | cosine (to 0 at the last update)
    batch_size: int = 128
    iterations: int = 600               # progressive: updates per fold
    ema_decay: float = 0.999
    checkpoint_every: Optional[int] = None  # save the training state every N updates (null: 10 times a run; 0: off)
    checkpoint_seconds: float = 180.0   # ... and whenever this long has passed since the last save (0: not by time)
    grad_clip: Optional[float] = None   # clip the gradient norm to this (null: off)


@dataclass(frozen=True)
class EvaluateConfig:
    num_samples: int = 500
    batch_size: int = 250
    seed: int = 1234                    # image k starts from the noise of seed + k
    consistency_samples: int = 200      # images of the teacher's T-step DDIM for consistency_ratio
    feature_network: str = "classifier"     # classifier | inception
    inception_weights: Optional[str] = None  # default: $TORCH_HOME/hub/checkpoints/<file>
    classifier_iterations: int = 600


@dataclass(frozen=True)
class RegistryConfig:
    model_name: str = "sfddm-student"   # MLflow registered model
    max_fid: float = 100.0              # promotion gate on fid.student (same feature network, sample count)


@dataclass(frozen=True)
class Config:
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda
    precision: str = "fp32"             # fp32 | bf16: bf16 autocast of training and sampling on CUDA
    channels_last: bool = False         # CUDA: UNets in channels_last memory format (training and sampling)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    # methods.<method name>: that method's own settings, plain data until the method types them
    # (Method.settings_of); `distill` holds the settings the shipped methods share.
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def student_timesteps(self):
        return diffusion.student_timesteps(self.teacher.num_train_timesteps, self.student.steps,
                                           self.student.spacing)


CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "precision": ("fp32", "bf16"),
    "data.source": ("digits", "photos", "cifar10", "folder"),
    "data.channels": (1, 3),
    "teacher.source": ("train", "pretrained"),
    "teacher.beta_schedule": diffusion.BETA_SCHEDULES,
    "student.init": ("teacher", "random", "copy"),
    "distill.loss": ("l1", "l2"),
    "distill.inputs": ("forward_process", "teacher_path"),
    "distill.step_sampling": ("uniform", "loss"),
    "distill.step_loss": ("sampler_output", "eps"),
    "distill.lr_decay": ("constant", "cosine"),
    "evaluate.feature_network": ("classifier", "inception"),
}
POSITIVE = {"data.image_size", "data.max_images", "teacher.num_train_timesteps", "teacher.lr",
            "teacher.batch_size", "teacher.iterations", "teacher.unet.layers_per_block",
            "teacher.unet.norm_num_groups", "student.steps", "distill.substeps", "distill.lr",
            "distill.batch_size", "distill.iterations", "evaluate.num_samples", "evaluate.batch_size", "evaluate.consistency_samples",
            "evaluate.classifier_iterations", "registry.max_fid",
            "teacher.grad_clip", "distill.grad_clip"}
NON_NEGATIVE = {"seed", "evaluate.seed", "distill.pointwise_weight", "distill.hidden_weight", "distill.warmup",
                "distill.trajectory_weight", "teacher.checkpoint_every", "distill.checkpoint_every",
                "teacher.checkpoint_seconds", "distill.checkpoint_seconds"}
UNIT_INTERVAL = {"data.test_fraction", "teacher.ema_decay", "distill.ema_decay"}
TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "text"}


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type hint, converting lists to tuples; raise ConfigError if it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(name): _convert(item, args[1], f"{key}.{name}") for name, item in value.items()}
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arm, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1])
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(hint, value, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
        return tuple(_convert(v, args[0], f"{key}[{k}]") for k, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):     # YAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {TYPE_NAMES.get(hint, hint)}, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in values:
        if name not in fields:
            near = difflib.get_close_matches(str(name), fields, n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else ""
            raise ConfigError(f"{prefix}{name}: unknown key{hint}; expected one of {sorted(fields)}")
    return cls(**{name: _convert(values[name], hints[name], prefix + name) for name in values})


def section(cls, values: dict, key: str):
    """An instance of the dataclass `cls` from the plain mapping `values` found at the dotted `key`
    (a method's own settings, methods.<name>): keys not given take cls's defaults; an unknown key or a
    value of the wrong type raises ConfigError naming key.<field> and what was expected."""
    return _convert(values, cls, key)


def _walk(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _walk(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value


def validate(cfg: Config) -> Config:
    """Range and cross-field checks; returns cfg unchanged or raises ConfigError."""
    for key, value in _walk(cfg):
        if value is None:
            continue
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{key}: {value!r} is not one of {list(CHOICES[key])}")
        if key in POSITIVE and not value > 0:
            kind = "integer" if isinstance(value, int) else "number"
            raise ConfigError(f"{key}: expected a positive {kind}, got {value!r}")
        if key in NON_NEGATIVE and value < 0:
            raise ConfigError(f"{key}: expected a number >= 0, got {value!r}")
        if key in UNIT_INTERVAL and not 0 <= value < 1:
            raise ConfigError(f"{key}: expected a number in [0, 1), got {value!r}")
    if isinstance(cfg.student.spacing, str) and cfg.student.spacing not in diffusion.SPACINGS:
        raise ConfigError(f"student.spacing: {cfg.student.spacing!r} is not one of "
                          f"{list(diffusion.SPACINGS)} or a list of teacher timesteps")
    try:
        cfg.student_timesteps
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.teacher.source == "train":
        last_beta = diffusion.beta_schedule(cfg.teacher.beta_schedule, cfg.teacher.num_train_timesteps)[-1]
        if last_beta >= 1.0:        # abar reaches 0 there: x0 no longer follows from eps
            raise ConfigError(f"teacher.num_train_timesteps: {cfg.teacher.num_train_timesteps} makes the "
                              f"{cfg.teacher.beta_schedule} schedule's last beta {last_beta:.3g}; expected "
                              "a beta below 1 (the linear schedule needs T > 20)")
    unet = cfg.teacher.unet
    if len(unet.attention) != len(unet.block_out_channels):
        raise ConfigError(f"teacher.unet.attention: expected {len(unet.block_out_channels)} entries, one "
                          f"per block_out_channels, got {list(unet.attention)}")
    for ch in unet.block_out_channels:
        if ch <= 0 or ch % unet.norm_num_groups:
            raise ConfigError(f"teacher.unet.block_out_channels: {ch} must be a positive multiple of "
                              f"teacher.unet.norm_num_groups = {unet.norm_num_groups}")
    factor = 2 ** (len(unet.block_out_channels) - 1)
    if cfg.data.image_size % factor:
        raise ConfigError(f"data.image_size: {cfg.data.image_size} cannot pass a UNet with "
                          f"{len(unet.block_out_channels)} levels; expected a multiple of {factor}")
    if cfg.data.source == "digits" and cfg.data.channels != 1:
        raise ConfigError(f"data.channels: digits are grayscale, expected 1, got {cfg.data.channels}")
    if cfg.data.source == "cifar10" and cfg.data.channels != 3:
        raise ConfigError(f"data.channels: cifar10 is RGB, expected 3, got {cfg.data.channels}")
    if cfg.data.source == "folder" and not cfg.data.path:
        raise ConfigError("data.path: the folder source needs the path of an image folder")
    if cfg.data.source == "cifar10" and not (cfg.data.path or cfg.data.download):
        raise ConfigError("data.path: cifar10 needs the folder holding cifar-10-batches-py "
                          "(or data.download: true where the network allows)")
    if not cfg.registry.model_name.strip():
        raise ConfigError("registry.model_name: expected a non-empty name")
    if cfg.evaluate.consistency_samples > cfg.evaluate.num_samples:
        raise ConfigError(f"evaluate.consistency_samples: {cfg.evaluate.consistency_samples} exceeds "
                          f"evaluate.num_samples = {cfg.evaluate.num_samples}")
    if cfg.teacher.source == "pretrained" and not cfg.teacher.uri:
        raise ConfigError("teacher.uri: teacher.source pretrained needs a local folder, s3:// URI or hub id")
    return cfg


def from_dict(values: dict) -> Config:
    if not isinstance(values, dict):
        raise ConfigError(f"params: expected a mapping at the top level, got {type(values).__name__}")
    return validate(_build(Config, values))


def load(path: Union[str, Path] = "params.yaml", overrides: Optional[dict] = None) -> Config:
    """Read params.yaml (a missing file means all defaults), apply dotted overrides, validate."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) if path.exists() else {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(err)})") from None
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level, "
                          f"got {type(values).__name__}")
    return with_overrides(values, overrides or {})


def with_overrides(values: dict, overrides: dict) -> Config:
    """params-style `values` (changed in place) with dotted overrides applied, validated."""
    for dotted, value in overrides.items():
        node = values
        *parents, last = dotted.split(".")
        for depth, part in enumerate(parents, 1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {'.'.join(parents[:depth])} holds a value ({node!r}), "
                                  "not a section of settings")
        node[last] = value
    return from_dict(values)


def with_settings_text(values: dict, text: str) -> Config:
    """params-style `values` with the overrides in `text`, a YAML mapping of dotted keys such as
    "{student.steps: 8, distill.iterations: 2000}" (the pipeline's `settings` parameter; "": none)."""
    try:
        overrides = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as err:
        raise ConfigError(f"settings: not valid YAML ({yaml_problem(err)})") from None
    if not isinstance(overrides, dict):
        raise ConfigError(f"settings: expected a mapping of dotted keys such as {{student.steps: 8}}, got {text!r}")
    return with_overrides(values, {str(key): value for key, value in overrides.items()})


def yaml_problem(err: yaml.YAMLError) -> str:
    """What a YAML parser error says is wrong, and where, on one line."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + (getattr(err, "problem", None) or str(err).splitlines()[0])


def to_dict(cfg: Config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save(cfg: Config, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML next to an output."""
    from .io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
