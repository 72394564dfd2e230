"""The `sfddm` command line: one subcommand per stage, each a thin call into the library.

Settings come from params.yaml (--params) with dotted overrides (--set student.steps=10), validated
once by sfddm_core.config. Bad input prints one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from . import config as config_lib
from .errors import SfddmError


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE, e.g. student.steps=10")
    return key, yaml.safe_load(value)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    settings = argparse.ArgumentParser(add_help=False)
    settings.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings file")
    settings.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                          metavar="KEY=VALUE", help="override a setting, e.g. --set student.steps=10")
    parser = argparse.ArgumentParser(prog="sfddm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, help_text, **paths):
        sub = commands.add_parser(name, help=help_text, parents=[settings])
        for flag, default in paths.items():
            sub.add_argument(f"--{flag.replace('_', '-')}", type=Path, default=Path(default))
        return sub

    command("prepare", "read the data source into data/prepared (train/test npz + meta.json)",
            out="data/prepared")
    command("train-classifier", "train the FID feature classifier on the train split",
            data="data/prepared", out="data/classifier.pt")
    command("train-teacher", "train (or import) the teacher DDPM", data="data/prepared",
            out="models/teacher", loss_csv="metrics/teacher_loss.csv")
    command("sample-teacher", "sample the teacher over all T steps (cached for evaluate)",
            teacher="models/teacher", out="samples/teacher")
    command("distill", "SFDDM: distil the teacher into a T'-step student", teacher="models/teacher",
            data="data/prepared", out="models/student", loss_csv="metrics/distill_loss.csv")
    command("evaluate", "FID, speed and consistency of the student against the baselines",
            teacher="models/teacher", student="models/student", teacher_samples="samples/teacher",
            data="data/prepared", classifier="data/classifier.pt", metrics="metrics/evaluate.json",
            reports="reports/evaluate")
    sample = command("sample", "sample any model folder to a PNG grid and an .npz", model="models/student",
                     out="reports/samples")
    sample.add_argument("--num-images", type=_positive_int, default=64)
    sample.add_argument("--steps", type=_positive_int, default=None,
                        help="default: all of the model's own steps; fewer: trailing subset")
    sample.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    sample.add_argument("--seed", type=int, default=0, help="image k uses seed + k")
    return parser


def run(args: argparse.Namespace) -> None:
    cfg = config_lib.load(args.params, dict(args.overrides))
    if args.command == "prepare":
        from . import data
        data.prepare(cfg.data, cfg.seed, args.out)
    elif args.command == "train-classifier":
        from . import fid
        fid.train_and_save_classifier(cfg, args.data, args.out)
    elif args.command == "train-teacher":
        from . import teacher
        teacher.run(cfg, args.data, args.out, args.loss_csv)
    elif args.command == "sample-teacher":
        from . import evaluate
        evaluate.sample_teacher(cfg, args.teacher, args.out)
    elif args.command == "distill":
        from . import distill
        distill.run(cfg, args.teacher, args.data, args.out, args.loss_csv)
    elif args.command == "evaluate":
        from . import evaluate
        metrics = evaluate.evaluate(cfg, args.teacher, args.student, args.teacher_samples, args.data,
                                    args.classifier, args.metrics, args.reports)
        print(yaml.safe_dump(metrics, sort_keys=False), end="")
    elif args.command == "sample":
        from . import evaluate
        evaluate.sample_to_files(cfg, args.model, args.out, args.num_images, args.steps, args.sampler,
                                 args.seed)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except SfddmError as err:
        print(f"sfddm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
