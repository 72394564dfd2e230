"""The bad input catalogue (issue 5): every row is one mistake a user can make, run through the real CLI.

Each must end with exit status 2, exactly one line on stderr that names the key or file and what was
expected, and no output: neither the command's output paths nor a temporary sibling of one.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import boto3
import numpy as np
import pytest
import yaml
from conftest import TINY_PARAMS, make_unet, merged
from PIL import Image

from mlflow_server import S3_ENV, free_port, fresh_database
from sfddm_cli import cli
from sfddm_core import data, diffusion, models, tracking
from sfddm_core.config import DataConfig

# Every output flag of a command points at tmp_path/out*, so one look for out* and .out* finds leftovers.
OUTPUTS = {"out": "out", "loss_csv": "out.csv", "checkpoint_dir": "out-checkpoints",
           "gate_output": "out.json"}
COMMAND_OUTPUTS = {"prepare": ("out",), "train-teacher": ("out", "loss_csv", "checkpoint_dir"),
                   "distill": ("out", "loss_csv", "checkpoint_dir"), "sample": ("out",),
                   "promote": ("gate_output",)}
TEACHER_STEPS = TINY_PARAMS["teacher"]["num_train_timesteps"]
TEACHER_BUCKET = "sfddm-teachers"
THREE_LEVELS = {"block_out_channels": [8, 16, 32], "attention": [False, False, True]}   # halves images twice
AWS_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
             "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


class Workspace:
    """One case's tmp_path: its params file, the tiny fixtures it asks for, and its environment."""

    def __init__(self, root: Path, monkeypatch, request):
        self.root, self.monkeypatch, self.request = root, monkeypatch, request
        self.params_file = root / "params.yaml"
        self.set_params({})
        monkeypatch.setenv("SFDDM_CACHE", str(root / "cache"))     # s3:// downloads land here
        for name in AWS_NAMES:
            monkeypatch.delenv(name, raising=False)
        # boto3's default session keeps the credentials it first resolved in this process (an earlier S3 test
        # on this worker): each case resolves them afresh from its own environment.
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)

    def set_params(self, changes: dict) -> None:
        self.params_file.write_text(yaml.safe_dump(merged(TINY_PARAMS, changes)))

    def pretrained(self, uri: str, **teacher) -> None:
        self.set_params({"teacher": {"source": "pretrained", "uri": uri, **teacher}})

    def teacher(self, channels: int = 1, size: int = 8) -> Path:
        """A tiny random DDPM teacher folder over TEACHER_STEPS steps."""
        folder = self.root / f"teacher-{channels}x{size}"
        if not folder.exists():
            abar = diffusion.alphas_cumprod(diffusion.beta_schedule("linear", TEACHER_STEPS))
            models.save_teacher(models.DiffusionModel(make_unet(channels=channels, size=size), abar), folder)
        return folder

    def images(self, count: int = 4, mode: str = "L") -> Path:
        folder = self.root / f"images-{mode}"
        folder.mkdir(exist_ok=True)
        for k in range(count):
            Image.new(mode, (10, 10), 40 * k).save(folder / f"{k}.png")
        return folder

    def prepared(self, channels: int) -> Path:
        folder = self.root / f"prepared-{channels}"
        cfg = DataConfig(source="folder", path=str(self.images(mode={1: "L", 3: "RGB"}[channels])),
                         channels=channels)
        data.prepare(cfg, seed=0, out_dir=folder)
        return folder

    def s3(self, credentials: bool = True) -> str:
        """moto's S3 endpoint, with the test credentials in the environment or with none anywhere."""
        endpoint = self.request.getfixturevalue("moto_s3")
        if credentials:
            for name, value in S3_ENV.items():
                self.monkeypatch.setenv(name, value)
        else:   # boto3 also looks in ~/.aws and the instance metadata service
            self.monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(self.root / "no-credentials"))
            self.monkeypatch.setenv("AWS_CONFIG_FILE", str(self.root / "no-config"))
            self.monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        return endpoint

    def tracking(self, uri: str) -> None:
        """MLflow on, at uri, for this case only; connect()'s HTTP defaults are undone afterwards."""
        self.monkeypatch.setenv("SFDDM_TRACKING", "on")
        self.monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        for name, value in tracking.HTTP_DEFAULTS.items():
            self.monkeypatch.setenv(name, value)

    def registry(self, model_name: str) -> None:
        """A fresh SQLite registry holding one registered model, "empty", with no versions; params name
        model_name as registry.model_name."""
        from mlflow import MlflowClient
        uri = fresh_database(self.request.getfixturevalue("tmp_path_factory"), self.root / "mlflow.db")
        MlflowClient(uri).create_registered_model("empty")
        self.tracking(uri)
        self.set_params({"registry": {"model_name": model_name}})

    def unreachable_server(self) -> None:
        self.tracking(f"http://127.0.0.1:{free_port()}")


@pytest.fixture(scope="module")
def moto_s3():
    """moto's S3 server on 127.0.0.1 with an empty bucket TEACHER_BUCKET."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                 region_name=S3_ENV["AWS_DEFAULT_REGION"]).create_bucket(Bucket=TEACHER_BUCKET)
    yield endpoint
    server.stop()


# ---- fixture edits for single cases ----

def with_params(changes: dict) -> Callable[[Workspace], None]:
    return lambda ws: ws.set_params(changes)


def write_params_text(text: str) -> Callable[[Workspace], None]:
    return lambda ws: ws.params_file.write_text(text)


def folder_with(*files: tuple[str, bytes]) -> Callable[[Workspace], Path]:
    """A folder source of three good PNGs plus the given (name, bytes) files; params point at it."""
    def build(ws: Workspace) -> Path:
        folder = ws.images(count=3)
        for name, content in files:
            (folder / name).write_bytes(content)
        ws.set_params({"data": {"source": "folder", "path": str(folder)}})
        return folder
    return build


def truncated_png(ws: Workspace) -> None:
    """A noise PNG cut off halfway: its header reads, its pixel data ends early."""
    folder = folder_with()(ws)
    path = folder / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def foreign_teacher(edit: Callable[[Path], None]) -> Callable[[Workspace], Path]:
    """The tiny teacher as a diffusers folder from elsewhere (no sfddm.json listing its hashes), edited."""
    def build(ws: Workspace) -> Path:
        folder = ws.teacher()
        (folder / "sfddm.json").unlink()
        edit(folder)
        return folder
    return build


def scheduler_config_text(text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / "scheduler/scheduler_config.json").write_text(text)


def set_prediction_type(folder: Path) -> None:
    path = folder / "scheduler/scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))


def truncate_weights(folder: Path) -> None:
    path = folder / "unet/diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def truncated_split(ws: Workspace) -> Path:
    folder = ws.prepared(1)
    path = folder / "train.npz"
    path.write_bytes(path.read_bytes()[:200])
    return folder


@dataclass(frozen=True)
class Bad:
    """One bad input: the command, the texts its one error line must hold (the key or file, {root}
    standing for tmp_path, and what was expected), what to set up, and the arguments after the command
    (building the fixtures they name)."""
    command: str
    expect: tuple[str, ...]
    setup: Optional[Callable[[Workspace], object]]
    args: Optional[Callable[[Workspace], list[str]]]


def bad(case_id: str, command: str, expect: tuple[str, ...],
        setup: Optional[Callable[[Workspace], object]] = None,
        args: Optional[Callable[[Workspace], list[str]]] = None):
    return pytest.param(Bad(command, expect, setup, args), id=case_id)


def student_params(**student):
    return with_params({"student": student})


def teacher_and_data(ws: Workspace, channels: int = 1) -> list[str]:
    return ["--teacher", str(ws.teacher()), "--data", str(ws.prepared(channels))]


CASES = [
    # ---- student steps and the index map ----
    bad("steps-not-an-integer", "prepare", ("student.steps", "expected an integer, got 2.5"),
        student_params(steps=2.5)),
    bad("steps-text", "prepare", ("student.steps", "expected an integer, got 'four'"),
        student_params(steps="four")),
    bad("steps-negative", "prepare", ("student.steps", "expected a positive integer, got -3"),
        args=lambda ws: ["--set", "student.steps=-3"]),
    bad("steps-zero", "prepare", ("student.steps", "expected a positive integer, got 0"),
        student_params(steps=0)),
    bad("T-too-small-for-linear", "prepare", ("teacher.num_train_timesteps", "20", "last beta 1", "T > 20"),
        with_params({"teacher": {"num_train_timesteps": 20}, "student": {"steps": 4}})),
    bad("steps-above-T", "prepare", ("student.steps", f"expected 1 <= steps <= T = {TEACHER_STEPS}"),
        student_params(steps=TEACHER_STEPS + 1)),
    bad("spacing-duplicate", "prepare", ("student.spacing", "strictly increasing", "[0, 5, 5]"),
        student_params(steps=3, spacing=[0, 5, 5])),
    bad("spacing-unsorted", "prepare", ("student.spacing", "strictly increasing", "[10, 5, 20]"),
        student_params(steps=3, spacing=[10, 5, 20])),
    bad("spacing-above-T", "prepare",
        ("student.spacing", f"[0, {TEACHER_STEPS - 1}]", f"[0, 5, {TEACHER_STEPS}]"),
        student_params(steps=3, spacing=[0, 5, TEACHER_STEPS])),
    bad("spacing-negative", "prepare", ("student.spacing", f"[0, {TEACHER_STEPS - 1}]", "[-1, 5, 10]"),
        student_params(steps=3, spacing=[-1, 5, 10])),
    bad("spacing-length", "prepare", ("student.spacing", "2 timesteps", "student.steps = 3"),
        student_params(steps=3, spacing=[5, 10])),
    bad("spacing-not-integers", "prepare", ("student.spacing[1]", "expected an integer, got 'x'"),
        student_params(steps=3, spacing=[0, "x", 10])),
    bad("spacing-leading-truncates", "prepare", ("student.spacing", "leading needs T % steps == 0"),
        student_params(steps=3, spacing="leading")),
    bad("spacing-unknown", "prepare", ("student.spacing", "'middle' is not one of"),
        student_params(spacing="middle")),
    # ---- unknown keys and wrong types ----
    bad("unknown-section", "prepare", ("studnet: unknown key", "did you mean student?"),
        with_params({"studnet": {"steps": 4}})),
    bad("misspelled-key", "prepare", ("distill.substep: unknown key", "did you mean distill.substeps?"),
        with_params({"distill": {"substep": 4}})),
    bad("misspelled-set", "prepare",
        ("teacher.unet.attension: unknown key", "did you mean teacher.unet.attention?"),
        args=lambda ws: ["--set", "teacher.unet.attension=[false, true]"]),
    bad("unknown-key", "prepare", ("teacher.colour: unknown key", "expected one of ["),
        with_params({"teacher": {"colour": "blue"}})),
    bad("section-not-a-mapping", "prepare", ("student", "expected a mapping, got 4"),
        with_params({"student": 4})),
    bad("set-below-a-value", "prepare", ("--set seed.value", "seed holds a value (0)", "not a section"),
        with_params({"seed": 0}), args=lambda ws: ["--set", "seed.value=1"]),
    bad("list-as-text", "prepare",
        ("teacher.unet.block_out_channels", "expected a non-empty list, got '16,32'"),
        with_params({"teacher": {"unet": {"block_out_channels": "16,32"}}})),
    bad("bool-as-text", "prepare", ("data.download", "expected true or false, got 'maybe'"),
        with_params({"data": {"download": "maybe"}})),
    bad("number-as-text", "prepare", ("distill.lr", "expected a number, got 'fast'"),
        with_params({"distill": {"lr": "fast"}})),
    bad("params-not-yaml", "prepare", ("{root}/params.yaml", "not valid YAML"),
        write_params_text("student: [1, 2\n")),
    bad("params-a-list", "prepare", ("{root}/params.yaml", "expected a mapping of settings"),
        write_params_text("- 1\n- 2\n")),
    # ---- values out of range ----
    bad("distill-batch-size-zero", "prepare", ("distill.batch_size", "expected a positive integer, got 0"),
        with_params({"distill": {"batch_size": 0}})),
    bad("teacher-batch-size-negative", "prepare",
        ("teacher.batch_size", "expected a positive integer, got -8"),
        with_params({"teacher": {"batch_size": -8}})),
    bad("ema-decay-one", "prepare", ("distill.ema_decay", "expected a number in [0, 1), got 1.0"),
        with_params({"distill": {"ema_decay": 1.0}})),
    bad("unknown-loss", "prepare", ("distill.loss", "'huber' is not one of ['l1', 'l2']"),
        with_params({"distill": {"loss": "huber"}})),
    bad("unknown-lr-decay", "prepare", ("distill.lr_decay", "'linear' is not one of ['constant', 'cosine']"),
        with_params({"distill": {"lr_decay": "linear"}})),
    bad("warmup-negative", "prepare", ("distill.warmup", "expected a number >= 0, got -5"),
        with_params({"distill": {"warmup": -5}})),
    bad("teacher-path-with-hidden-term", "distill",
        ("distill.inputs: teacher_path trains the trajectory term alone", "got 0.0 and 1.0"),
        with_params({"distill": {"inputs": "teacher_path", "hidden_weight": 1.0}}), args=teacher_and_data),
    bad("unknown-method", "distill", ("distill.method", "'consistency' is not one of ['sfddm', 'progressive']"),
        with_params({"distill": {"method": "consistency"}}), args=teacher_and_data),
    bad("unknown-beta-schedule", "prepare", ("teacher.beta_schedule", "'cosine' is not one of"),
        with_params({"teacher": {"beta_schedule": "cosine"}})),
    bad("unknown-source", "prepare", ("data.source", "'mnist' is not one of"),
        with_params({"data": {"source": "mnist"}})),
    bad("unknown-device", "prepare", ("device", "'tpu' is not one of"), with_params({"device": "tpu"})),
    bad("two-channels", "prepare", ("data.channels", "2 is not one of [1, 3]"),
        with_params({"data": {"channels": 2}})),
    bad("image-size-odd", "prepare", ("data.image_size", "expected a multiple of 2"),
        with_params({"data": {"image_size": 7}})),
    bad("image-size-three-levels", "prepare", ("data.image_size", "3 levels", "expected a multiple of 4"),
        with_params({"data": {"image_size": 10}, "teacher": {"unet": THREE_LEVELS}})),
    bad("folder-source-without-path", "prepare", ("data.path", "needs the path of an image folder"),
        with_params({"data": {"source": "folder"}})),
    bad("pretrained-without-uri", "prepare", ("teacher.uri", "needs a local folder, s3:// URI or hub id"),
        with_params({"teacher": {"source": "pretrained"}})),
    # ---- command-line options ----
    bad("set-without-value", "prepare", ("--set", "'nonsense': expected KEY=VALUE"),
        args=lambda ws: ["--set", "nonsense"]),
    bad("set-value-not-yaml", "prepare", ("--set", "'student.spacing=[1,'", "not valid YAML"),
        args=lambda ws: ["--set", "student.spacing=[1,"]),
    bad("num-images-zero", "sample", ("--num-images", "expected a positive integer, got '0'"),
        args=lambda ws: ["--model", str(ws.teacher()), "--num-images", "0"]),
    bad("sample-steps-above-T", "sample", ("--num-inference-steps", f"exceeds the model's {TEACHER_STEPS} timesteps"),
        args=lambda ws: ["--model", str(ws.teacher()), "--num-inference-steps", str(TEACHER_STEPS + 1)]),
    # ---- the data source ----
    bad("data-folder-missing", "prepare", ("{root}/nowhere", "expected a folder of .png/.jpg images"),
        lambda ws: ws.set_params({"data": {"source": "folder", "path": str(ws.root / "nowhere")}})),
    bad("data-folder-empty", "prepare", ("{root}/images-L", "no .png/.jpg/.jpeg images"),
        lambda ws: ws.set_params({"data": {"source": "folder", "path": str(ws.images(count=0))}})),
    bad("image-truncated", "prepare", ("{root}/images-L/cut.png", "unreadable image"), truncated_png),
    bad("image-corrupt", "prepare", ("{root}/images-L/notes.jpg", "unreadable image"),
        folder_with(("notes.jpg", b"not a JPEG, just text\n"))),
    bad("prepared-data-missing", "train-teacher", ("{root}/nowhere/meta.json", "run `sfddm prepare` first"),
        args=lambda ws: ["--data", str(ws.root / "nowhere")]),
    bad("prepared-data-truncated", "train-teacher", ("{root}/prepared-1/train.npz", "truncated"),
        args=lambda ws: ["--data", str(truncated_split(ws))]),
    bad("data-rgb-params-gray", "train-teacher",
        ("{root}/prepared-3", "(3, 8, 8)", "params ask for (1, 8, 8)"),
        args=lambda ws: ["--data", str(ws.prepared(3))]),
    bad("data-rgb-teacher-gray", "distill", ("{root}/prepared-3", "(3, 8, 8)", "the teacher takes (1, 8, 8)"),
        args=lambda ws: teacher_and_data(ws, channels=3)),
    # ---- the teacher folder ----
    bad("teacher-folder-missing", "sample", ("{root}/nope", "missing unet/config.json"),
        args=lambda ws: ["--model", str(ws.root / "nope")]),
    bad("teacher-without-scheduler", "distill", ("teacher-1x8", "missing scheduler/scheduler_config.json"),
        foreign_teacher(lambda folder: (folder / "scheduler/scheduler_config.json").unlink()),
        args=teacher_and_data),
    bad("teacher-without-weights", "distill",
        ("teacher-1x8", "missing unet/diffusion_pytorch_model.safetensors"),
        foreign_teacher(lambda folder: (folder / "unet/diffusion_pytorch_model.safetensors").unlink()),
        args=teacher_and_data),
    bad("teacher-weights-truncated", "distill", ("teacher-1x8/unet", "cannot load the UNet"),
        foreign_teacher(truncate_weights), args=teacher_and_data),
    bad("teacher-weights-changed", "distill",
        ("teacher-1x8/unet/diffusion_pytorch_model.safetensors", "sha256"),
        lambda ws: truncate_weights(ws.teacher()), args=teacher_and_data),
    bad("teacher-scheduler-incomplete", "distill",
        ("teacher-1x8/scheduler/scheduler_config.json", "num_train_timesteps"),
        foreign_teacher(scheduler_config_text("{}")), args=teacher_and_data),
    bad("teacher-scheduler-not-json", "distill", ("teacher-1x8/scheduler/scheduler_config.json", "JSON"),
        foreign_teacher(scheduler_config_text('{"num_train')), args=teacher_and_data),
    bad("teacher-v-prediction", "distill", ("teacher-1x8", "'v_prediction'", "prediction_type: epsilon"),
        foreign_teacher(set_prediction_type), args=teacher_and_data),
    bad("teacher-other-T", "distill", ("teacher.num_train_timesteps", f"set it to {TEACHER_STEPS}"),
        with_params({"teacher": {"num_train_timesteps": 2 * TEACHER_STEPS}}), args=teacher_and_data),
    bad("pretrained-rgb-data-gray", "train-teacher", ("teacher.uri", "takes images (3, 8, 8)", "(1, 8, 8)"),
        lambda ws: ws.pretrained(str(ws.teacher(channels=3)))),
    bad("pretrained-other-size", "train-teacher", ("teacher.uri", "takes images (1, 16, 16)", "(1, 8, 8)"),
        lambda ws: ws.pretrained(str(ws.teacher(size=16)))),
    bad("pretrained-uri-nonsense", "train-teacher",
        ("teacher.uri", "'no/such/teacher' is not a local folder"),
        lambda ws: ws.pretrained("no/such/teacher")),
    # ---- object store ----
    bad("s3-no-credentials", "train-teacher", ("teacher.uri", "no AWS credentials", "AWS_ACCESS_KEY_ID"),
        lambda ws: ws.pretrained(f"s3://{TEACHER_BUCKET}/teacher", s3_endpoint_url=ws.s3(credentials=False))),
    bad("s3-no-bucket", "train-teacher", ("teacher.uri", "s3://no-such-bucket/teacher", "NoSuchBucket"),
        lambda ws: ws.pretrained("s3://no-such-bucket/teacher", s3_endpoint_url=ws.s3())),
    bad("s3-empty-prefix", "train-teacher",
        ("teacher.uri", f"no objects under s3://{TEACHER_BUCKET}/nothing"),
        lambda ws: ws.pretrained(f"s3://{TEACHER_BUCKET}/nothing", s3_endpoint_url=ws.s3())),
    # ---- MLflow ----
    bad("mlflow-unreachable-stage", "prepare", ("MLflow tracking server http://127.0.0.1:", "unreachable",
                                                "MLFLOW_TRACKING_URI"), Workspace.unreachable_server),
    bad("mlflow-unreachable-promote", "promote", ("MLflow tracking server http://127.0.0.1:", "unreachable"),
        Workspace.unreachable_server),
    bad("promote-unknown-model", "promote", ("'ghost'", "run sfddm register first"),
        lambda ws: ws.registry("ghost")),
    bad("promote-model-without-versions", "promote", ("empty has no @challenger version", "sfddm register"),
        lambda ws: ws.registry("empty")),
    bad("promote-missing-version", "promote", ("empty has no version 3",),
        lambda ws: ws.registry("empty"), args=lambda ws: ["--version", "3"]),
    bad("promote-force-without-reason", "promote", ("forced promotion needs a reason", "--reason TEXT"),
        args=lambda ws: ["--force"]),
]


def library_logs_to_stderr(monkeypatch) -> None:
    """Point every plain logging.StreamHandler at the current (captured) sys.stderr: libraries such as
    diffusers set theirs up at import time, holding the stderr of that moment, so without this what
    they log during the command would escape the one-line check."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for handler in {h for logger in loggers for h in getattr(logger, "handlers", [])}:
        if type(handler) is logging.StreamHandler:
            monkeypatch.setattr(handler, "stream", sys.stderr)


def run_cli(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exit_:       # argparse's usage errors
        return exit_.code


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_exit_2_and_no_output(case: Bad, tmp_path, monkeypatch, request, capfd):
    ws = Workspace(tmp_path, monkeypatch, request)
    if case.setup:
        case.setup(ws)
    args = case.args(ws) if case.args else []
    outputs = [arg for name in COMMAND_OUTPUTS[case.command]
               for arg in (f"--{name.replace('_', '-')}", str(tmp_path / OUTPUTS[name]))]
    capfd.readouterr()                  # what building the fixtures printed is not the command's
    library_logs_to_stderr(monkeypatch)
    code = run_cli([case.command, "--params", str(ws.params_file), *args, *outputs])
    err = capfd.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for expected in case.expect:
        assert expected.replace("{root}", str(tmp_path)) in err, err
    assert not [p.name for p in tmp_path.iterdir() if p.name.lstrip(".").startswith("out")]
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_catalogue_has_at_least_25_distinct_cases():
    ids = [param.id for param in CASES]
    assert len(ids) >= 25 and len(set(ids)) == len(ids)
