"""The `sfddm` command line: one subcommand per stage, each a call of its function in sfddm_core.stages.

Settings come from params.yaml (--params) with dotted overrides (--set student.steps=10), validated
once by sfddm_core.config; --dry-run prints them resolved and exits. Bad input prints one line and exits
with status 2.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import yaml

from sfddm_core import config as config_lib
from sfddm_core import distributed, stages
from sfddm_core.errors import SfddmError


class _OneLineErrorParser(argparse.ArgumentParser):
    """A usage mistake, like a bad setting, is one line on stderr and exit status 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. student.steps=10")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML "
                                         f"({config_lib.yaml_problem(err)})") from None


def _result_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.=]+", text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected letters, digits, '_', '.' or '=' (a file-name part)")
    return text


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    settings = _OneLineErrorParser(add_help=False)
    settings.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings file")
    settings.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                          metavar="KEY=VALUE", help="override a setting, e.g. --set student.steps=10")
    settings.add_argument("--dry-run", action="store_true", help="print the resolved settings and exit")
    parser = _OneLineErrorParser(prog="sfddm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, help_text, **paths):
        sub = commands.add_parser(name, help=help_text, parents=[settings])
        sub.set_defaults(func=run_stage)
        for flag, default in paths.items():
            sub.add_argument(f"--{flag.replace('_', '-')}", type=Path, default=Path(default))
        return sub

    command("prepare", "read the data source into data/prepared (train/test npz + meta.json)",
            out="data/prepared")
    command("train-classifier", "train the FID feature classifier on the train split",
            data="data/prepared", out="data/classifier.pt")
    command("train-teacher", "train (or import) the teacher DDPM", data="data/prepared",
            out="models/teacher", loss_csv="metrics/teacher_loss.csv", checkpoint_dir="checkpoints/teacher")
    command("sample-teacher", "sample the teacher over all T steps (cached for evaluate)",
            teacher="models/teacher", out="samples/teacher")
    distill = command("distill", "SFDDM: distil the teacher into a T'-step student", teacher="models/teacher",
                      data="data/prepared", out="models/student", loss_csv="metrics/distill_loss.csv",
                      checkpoint_dir="checkpoints/distill")
    distill.add_argument("--classifier", type=Path, default=None,
                         help="the FID classifier (data/classifier.pt): FID and KID along distillation")
    distill.add_argument("--fid-csv", type=Path, default=Path("metrics/distill_fid.csv"),
                         help="where that FID curve goes (with --classifier)")
    command("evaluate", "FID, speed and consistency of the student against the baselines",
            teacher="models/teacher", student="models/student", teacher_samples="samples/teacher",
            data="data/prepared", classifier="data/classifier.pt", metrics="metrics/evaluate.json",
            reports="reports/evaluate")
    command("register", "register the student in the MLflow registry (alias challenger)",
            student="models/student", metrics="metrics/evaluate.json", data="data/prepared",
            output="metrics/register.json")
    promote = command("promote", "move alias champion to a version whose stored FID passes the gates")
    promote.set_defaults(func=promote_command)
    promote.add_argument("--version", type=_positive_int, default=None, help="default: the challenger")
    promote.add_argument("--force", action="store_true", help="skip the FID gates; needs --reason")
    promote.add_argument("--reason", default=None, help="recorded on the version as sfddm.forced_reason")
    promote.add_argument("--gate-output", type=Path, default=None,
                         help="write the decision JSON here and exit 0 on a refusal (dvc repro)")
    sample = command("sample", "sample any model folder to a PNG grid and an .npz", model="models/student",
                     out="reports/samples")
    sample.set_defaults(func=sample_command)
    sample.add_argument("--num-images", type=_positive_int, default=64)
    sample.add_argument("--num-inference-steps", type=_positive_int, default=None,
                        help="steps the sampler takes (default: all of the model's own; fewer: a trailing subset)")
    sample.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    sample.add_argument("--seed", type=int, default=0, help="image k uses seed + k")
    serve = command("serve", "serve a registered model over HTTP with `mlflow models serve` (POST /invocations)")
    serve.set_defaults(func=serve_command)
    serve.add_argument("--model-uri", default=None,
                       help="default: models:/<registry.model_name>@champion, from the tracking URI's registry")
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface")
    serve.add_argument("--port", type=_port, default=5001)

    device = command("device", "check the device the settings resolve to (device:) with a matrix product on "
                     "it; one line, exit 2 when it cannot be used (--set device=cuda: the GPU smoke test)")
    device.set_defaults(func=device_command)

    bench = commands.add_parser("bench", help="benchmarks against the baselines, into reports/benchmark.md")
    bench.set_defaults(func=bench_command)
    benches = bench.add_subparsers(dest="action", required=True)
    for name, help_text, paths in (
            ("quality", "the sweep of students and baselines on one teacher: FID, consistency, training compute",
             dict(teacher="models/teacher", data="data/prepared", classifier="data/classifier.pt",
                  teacher_samples="samples/teacher")),
            ("speed", "sampling and training throughput, our DDIM loop against diffusers'",
             dict(teacher="models/teacher", student="models/student", data="data/prepared")),
            ("preemption", "sfddm distill killed at 60% of its run and rerun, on 1 and 2 processes",
             dict(teacher="models/teacher", data="data/prepared")),
            ("attribution", "where a student's distance to its teacher's ODE comes from, step by step",
             dict(teacher="models/teacher", student="models/student", data="data/prepared",
                  classifier="data/classifier.pt", teacher_samples="samples/teacher"))):
        sub = benches.add_parser(name, help=help_text, parents=[settings])
        for flag, default in {**paths, "out": "reports"}.items():
            sub.add_argument(f"--{flag.replace('_', '-')}", type=Path, default=Path(default))
        sub.add_argument("--results-page", type=Path, default=None,
                         help="also regenerate this page's generated section (docs/benchmarks.md)")
        if name in ("quality", "attribution"):
            sub.add_argument("--dataset", default="digits",
                             help="digits (the chain of the path flags), photos16, photos32 (RGB crops of "
                                  "scikit-learn's sample photos) or folder:PATH; other than digits, the chain "
                                  "(and attribution's student) is built under OUT/bench/quality/chains/ "
                                  "(benchmarks/datasets.py)")
            sub.add_argument("--name", type=_result_name, default=None,
                             help="name this run's results (quality-<profile>[-<dataset>]-NAME.json, "
                                  "attribution[-<dataset>]-NAME.json), e.g. one with --set, so that it does not "
                                  "replace the run of the settings as they are")
        if name == "quality":
            sub.add_argument("--profile", choices=("fast", "full"), default="fast",
                             help="fast: minutes per variant on a CPU; full: params.yaml as is (a GPU)")
            sub.add_argument("--variants", type=lambda text: text.split(","), default=None,
                             help="comma-separated subset of the sweep (default: the profile's variants)")
        elif name == "speed":
            sub.add_argument("--batch-size", type=_positive_int, default=None, help="default: 512 on a GPU, 64 on a CPU")
            sub.add_argument("--loop-steps", type=_positive_int, default=50, help="steps of the loop comparison")
            sub.add_argument("--repeats", type=_positive_int, default=5, help="timed runs per measurement (median)")
            sub.add_argument("--teacher-steps", type=_positive_int, default=None,
                             help="time the teacher over this many of its T steps, scaled to T (default: all)")

    pipeline = commands.add_parser("pipeline", help="the Kubeflow pipeline: compile it, run it here, submit it")
    pipeline.set_defaults(func=pipeline_command)
    actions = pipeline.add_subparsers(dest="action", required=True)
    image = _OneLineErrorParser(add_help=False)     # sfddm_runtime/image.py checks and derives the reference
    image.add_argument("--image", default=None, metavar="REF",
                       help="the image every task runs: REGISTRY/sfddm:git-<commit> or NAME@sha256:<digest> "
                            "(default: REGISTRY/sfddm:git-<HEAD>, refused while image files are uncommitted)")
    image.add_argument("--registry", default=None, help="registry repository of the default (ghcr.io/sfddm)")
    variant = _OneLineErrorParser(add_help=False)   # what the compiled pipeline asks of the cluster
    variant.add_argument("--no-training-volume", dest="training_volume", action="store_false",
                         help="mount no ReadWriteMany training volume: 1 node x 1 GPU only, a retry starts over")
    variant.add_argument("--cpu-only", action="store_true", help="request no GPU and no GPU node pool")
    variant.add_argument("--max-budget-hours", type=float, default=None,
                         help="the largest teacher/distill budget a run accepts, which sizes the training steps' "
                              "timeouts (default: DEFAULT_MAX_BUDGET_HOURS of pipelines/sfddm_pipeline.py)")
    compile_ = actions.add_parser("compile", parents=[settings, image, variant],
                                  help="write the pipeline package; --params gives the default of `params`")
    compile_.add_argument("--out", type=Path, default=Path("pipelines/sfddm_pipeline.yaml"))
    arguments = _OneLineErrorParser(add_help=False)
    arguments.add_argument("--arg", dest="arguments", type=_override, action="append", default=[],
                           metavar="NAME=VALUE", help="a pipeline parameter, e.g. --arg settings='{student.steps: 8}'")
    run_local = actions.add_parser("run-local", parents=[settings, arguments],
                                   help="run the whole pipeline on this machine through kfp.local")
    run_local.add_argument("--root", type=Path, default=Path("kfp-local"), help="where task outputs go")
    submit = actions.add_parser("submit", parents=[settings, arguments, image, variant],
                                help="start a run on a Kubeflow Pipelines server")
    submit.add_argument("--host", required=True, help="KFP API address, e.g. http://localhost:8080")
    submit.add_argument("--experiment", default="sfddm")
    trainjob = actions.add_parser("trainjob", parents=[settings, image],
                                  help="print a training stage's Kubeflow Trainer TrainJob (YAML), as the "
                                       "pipeline would submit it")
    trainjob.add_argument("stage", choices=("teacher", "train-teacher", "distill"))
    trainjob.add_argument("--nodes", type=_positive_int, required=True, help="pods (nodes) of the job")
    trainjob.add_argument("--gpus-per-node", type=_positive_int, required=True, help="GPUs (processes) per pod")
    trainjob.add_argument("--run-id", default="manual", help="the pipeline run it belongs to (names the job)")
    trainjob.add_argument("--namespace", default="kubeflow", help="where it runs (KFP's run namespace)")
    trainjob.add_argument("--training-pvc", default="sfddm-training", help="the ReadWriteMany training volume")
    trainjob.add_argument("--budget-hours", type=float, default=24.0, help="its activeDeadlineSeconds, in hours")
    trainjob.add_argument("--data", type=Path, default=Path("data/prepared"),
                          help="prepared data whose hash enters the checkpoint fingerprint, if it exists")
    trainjob.add_argument("--teacher", type=Path, default=Path("models/teacher"),
                          help="distill: the teacher whose hash enters the checkpoint fingerprint, if it exists")
    return parser


def run_stage(args: argparse.Namespace, cfg) -> int:
    """A stage: its function in sfddm_core.stages, inside the process group when torchrun started several."""
    stage = args.command.replace("-", "_")
    if stage in stages.DATA_PARALLEL:                # under torchrun: join the process group first
        distributed.setup(cfg.device)
    elif distributed.launched_size() > 1:
        raise SfddmError(f"{args.command} runs as one process; only {' and '.join(stages.DATA_PARALLEL)} run "
                         f"under torchrun (WORLD_SIZE is {distributed.launched_size()})")
    try:
        result = STAGE_CALLS[stage](args, cfg)
    finally:
        distributed.teardown()
    if stage in PRINTED:
        print(yaml.safe_dump(result, sort_keys=False), end="")
    return 0


PRINTED = ("evaluate", "register")          # stages whose result goes to stdout (metrics, registration)
METHOD_COMMANDS = ("distill", "bench")      # the commands that distil: distill.method and its settings are checked


STAGE_CALLS = {
    "prepare": lambda a, cfg: stages.prepare(cfg, a.out),
    "train_classifier": lambda a, cfg: stages.train_classifier(cfg, a.data, a.out),
    "train_teacher": lambda a, cfg: stages.train_teacher(cfg, a.data, a.out, a.loss_csv, a.checkpoint_dir),
    "sample_teacher": lambda a, cfg: stages.sample_teacher(cfg, a.teacher, a.out),
    "distill": lambda a, cfg: stages.distill(cfg, a.teacher, a.data, a.out, a.loss_csv, a.checkpoint_dir,
                                             a.classifier, a.fid_csv),
    "evaluate": lambda a, cfg: stages.evaluate(cfg, a.teacher, a.student, a.teacher_samples, a.data,
                                               a.classifier, a.metrics, a.reports),
    "register": lambda a, cfg: stages.register(cfg, a.student, a.metrics, a.data, a.output).to_dict(),
}


def promote_command(args: argparse.Namespace, cfg) -> int:
    decision = stages.promote(cfg, args.version, args.force, args.reason, args.gate_output)
    print(yaml.safe_dump(decision.to_dict(), sort_keys=False), end="")
    return 0 if decision.promoted or args.gate_output else 1      # a refusal: 1; bad input: 2


def sample_command(args: argparse.Namespace, cfg) -> int:
    from sfddm_core import evaluate
    evaluate.sample_to_files(cfg, args.model, args.out, args.num_images, args.num_inference_steps, args.sampler,
                             args.seed)
    return 0


def serve_command(args: argparse.Namespace, cfg) -> None:
    """Become `mlflow models serve` on the model, in this environment (--env-manager local), with the
    tracking URI sfddm uses. Never returns: exec, so Ctrl-C and a pod's SIGTERM reach the server itself."""
    from sfddm_core import registry, tracking
    model_uri = args.model_uri or registry.champion_uri(cfg.registry.model_name)
    registry.check_servable(model_uri)
    # The server runs `uvicorn` by name: this environment's, found through PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", args.host, "-p", str(args.port)]
    os.execve(sys.executable, command, env)


def device_command(args: argparse.Namespace, cfg) -> int:
    from sfddm_core import io
    from sfddm_runtime import gpu_profile
    print(gpu_profile.device_report(io.resolve_device(cfg.device)))
    return 0


def bench_command(args: argparse.Namespace, cfg) -> int:
    from benchmarks import attribution, preemption, quality, report, speed
    if args.action == "quality":
        quality.quality(cfg, args.teacher, args.data, args.classifier, args.teacher_samples, args.out, args.profile,
                        args.variants, args.dataset, dict(args.overrides), args.name)
    elif args.action == "speed":
        speed.speed(cfg, args.teacher, args.student, args.data, args.out, args.batch_size, args.loop_steps,
                    args.repeats, args.teacher_steps)
    elif args.action == "preemption":
        preemption.preemption(cfg, args.teacher, args.data, args.out)
    else:
        attribution.step_attribution(cfg, args.teacher, args.student, args.data, args.classifier,
                                     args.teacher_samples, args.out, args.dataset, dict(args.overrides), args.name)
    benchmark_md = report.write(args.out)
    if args.results_page:
        report.update_results_page(args.results_page, benchmark_md)
    print(benchmark_md)
    return 0


def _variant(args: argparse.Namespace) -> dict:
    """The compile-time variant of `pipeline compile` / `pipeline submit` (build_pipeline's keywords)."""
    variant = {"training_volume": args.training_volume, "cpu_only": args.cpu_only}
    if args.max_budget_hours is not None:
        variant["max_budget_hours"] = args.max_budget_hours
    return variant


def pipeline_command(args: argparse.Namespace, cfg) -> int:
    import pipelines                # the only command that reaches the pipeline code (and kfp)
    if args.action == "compile":
        print(pipelines.compile_pipeline(args.out, args.params, args.image, args.registry, **_variant(args)))
    elif args.action == "run-local":
        version = pipelines.run_local(args.params, dict(args.overrides), args.root, dict(args.arguments))
        print(f"registered model version {version}")
    elif args.action == "trainjob":
        from sfddm_runtime import launcher
        print(launcher.review_yaml(args.stage, args.nodes, args.gpus_per_node, args.params, dict(args.overrides),
                                   args.image, args.registry, args.data, args.teacher, run_id=args.run_id,
                                   namespace=args.namespace, claim=args.training_pvc,
                                   budget_hours=args.budget_hours), end="")
    else:
        print(pipelines.submit(args.host, args.params, dict(args.arguments), args.experiment,
                               overrides=dict(args.overrides), image=args.image, registry=args.registry,
                               **_variant(args)))
    return 0


def run(args: argparse.Namespace) -> int:
    overrides = dict(getattr(args, "overrides", {}))
    if getattr(args, "dataset", None):      # bench quality, attribution: the dataset's settings, beneath --set
        from benchmarks.datasets import dataset_overrides
        overrides = {**dataset_overrides(args.dataset), **overrides}
    cfg = config_lib.load(args.params, overrides) if hasattr(args, "params") else None
    if args.command in METHOD_COMMANDS:
        from sfddm_core import methods      # only here: the other stages do not depend on the methods
        methods.checked(cfg)
    if getattr(args, "dry_run", False):     # the settings this command would run with, resolved; nothing else
        print(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False), end="")
        return 0
    return args.func(args, cfg)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except SfddmError as err:
        print(f"sfddm {args.command}: error: {err}", file=sys.stderr)
        return 2
