"""Serving throughput: requests and images per second of the champion behind the real `mlflow models serve`.

    python -m benchmarks.serving [--student models/student] [--requests 40] [--repeats 3] [--threads N] [--out reports]

The student (models/student when it exists, else the default config's architecture untrained: the time
of a request does not depend on the weights) is registered in a throwaway SQLite registry, forced to
champion, and served by `sfddm serve` (`make serve`'s command: one uvicorn worker, --env-manager local)
on 127.0.0.1. One client sends JSON requests (dataframe_split) one after another and decodes each
answer, so a figure includes the HTTP and JSON work a caller pays. Three request shapes:
    1 image     one row, num_images 1
    16 images   one row, num_images 16
    16 rows     16 rows of num_images 1 (MLflow's batch of requests, sampled as one batch)
Warm-up requests, then --repeats rounds of --requests timed requests of each shape in turn; median
and range over the rounds.
Writes reports/bench/serving.json and renders reports/benchmark.md again (report.py; its "Serving"
section is rendered from that file).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import requests

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"1 image": [[1]], "16 images": [[16]], "16 rows of 1 image": [[1]] * 16}
WARMUP_REQUESTS = 3
STARTUP_TIMEOUT_S = 180


class ScoringServer:
    """`sfddm serve` (which becomes `mlflow models serve`) on a free 127.0.0.1 port, in its own process
    group, with MLFLOW_TRACKING_URI `tracking_uri`; a context manager that yields its URL once /ping
    answers and stops it (and the uvicorn it started) on exit."""

    def __init__(self, tracking_uri: str, workdir: Path, params: Path = ROOT / "params.yaml"):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [str(Path(sys.executable).with_name("sfddm")), "serve", "--params", str(params),
                        "--port", str(self.port)]
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
        self.workdir, self.log = workdir, workdir / "serve.log"
        self.process: Optional[subprocess.Popen] = None

    def __enter__(self) -> str:
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.command, cwd=self.workdir, env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not answers(f"{self.url}/ping"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"sfddm serve did not answer /ping:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        return self.url

    def __exit__(self, *_) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def answers(url: str) -> bool:
    with contextlib.suppress(requests.RequestException):
        return requests.get(url, timeout=2).status_code == 200
    return False


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def untrained_student(out_dir: Path, params: Path) -> Path:
    """The default config's student architecture, T' and schedule, with untrained weights, as
    `sfddm distill` writes a student folder."""
    from sfddm_core import config, diffusion, models
    from sfddm_core.methods import METHODS
    cfg = config.load(params)
    T = cfg.teacher.num_train_timesteps
    phi = cfg.student_timesteps
    betas = diffusion.student_betas(diffusion.alphas_cumprod(diffusion.beta_schedule(cfg.teacher.beta_schedule, T)),
                                    phi)
    unet = models.build_unet(cfg.teacher.unet, cfg.data.image_size, cfg.data.channels)
    spacing = cfg.student.spacing if isinstance(cfg.student.spacing, str) else list(cfg.student.spacing)
    provenance = {"method": cfg.distill.method, "phi": phi.tolist(), "teacher_timesteps": T,
                  "student_steps": cfg.student.steps, "spacing": spacing, "teacher_source": "untrained",
                  "teacher_sha256": "0" * 64}
    METHODS[cfg.distill.method].save(unet, betas, out_dir, provenance, cfg)
    return out_dir


def register_champion(student: Path, workdir: Path, model_name: str) -> str:
    """The student as the champion of a new SQLite registry in workdir (placeholder metrics: this
    registry only serves the benchmark); returns its tracking URI."""
    from sfddm_core import registry
    os.environ["MLFLOW_TRACKING_URI"] = uri = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["SFDDM_TRACKING"] = "off"
    (workdir / "data").mkdir()
    (workdir / "data" / "meta.json").write_text('{"source": "benchmark"}\n')
    runs = ("teacher_ddpm", "teacher_ddim", "student")
    (workdir / "evaluate.json").write_text(json.dumps({
        **{section: {run: 0.0 for run in runs} for section in ("fid", "kid", "kid_std", "images_per_second")},
        "nfe": {run: 1 for run in runs}, "consistency_ratio": 0.0, "feature_network": "none", "num_samples": 1}))
    registry.register(student, workdir / "evaluate.json", workdir / "data", model_name)
    registry.promote(model_name, max_fid=0.0, force=True, reason="serving benchmark")
    return uri


def time_requests(url: str, rows: list, count: int, first_seed: int) -> float:
    """Seconds for `count` requests of these rows (num_images each), sent one after another."""
    session = requests.Session()
    began = time.perf_counter()
    for number in range(count):
        data = [[row[0], first_seed + 1000 * number + index] for index, row in enumerate(rows)]
        response = session.post(f"{url}/invocations", timeout=300,
                                json={"dataframe_split": {"columns": ["num_images", "seed"], "data": data}})
        response.raise_for_status()
        response.json()
    return time.perf_counter() - began


def measure(url: str, count: int, repeats: int) -> dict:
    """Each shape's timings; every repeat times all shapes in turn, so a slow spell of the machine hits
    them alike."""
    for rows in SHAPES.values():
        time_requests(url, rows, WARMUP_REQUESTS, first_seed=0)
    seconds = {name: [] for name in SHAPES}
    for repeat in range(repeats):
        for name, rows in SHAPES.items():
            seconds[name].append(time_requests(url, rows, count, first_seed=10**6 * (repeat + 1)))
    results = {}
    for name, rows in SHAPES.items():
        images = sum(row[0] for row in rows)
        results[name] = {"rows": len(rows), "images_per_request": images, "requests": count,
                         "seconds": seconds[name], "requests_per_second": [count / s for s in seconds[name]],
                         "images_per_second": [count * images / s for s in seconds[name]]}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, default=ROOT / "models" / "student")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--requests", type=int, default=40, help="timed requests per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    # The client runs on the same cores: with a thread on every core the server's torch threads contend with
    # it (on 2 cores, 2 threads measured 1.7 x slower per request than 1, and 4 x noisier).
    parser.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1),
                        help="torch threads of the server (OMP_NUM_THREADS; default: one per core but the client's)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    parser.add_argument("--results-page", type=Path, default=None,
                        help="also regenerate this page's generated section (docs/benchmarks.md)")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)     # the server's (it inherits the environment)
    import torch
    torch.set_num_threads(args.threads)                     # this process's too, which the report names
    from benchmarks import report
    from benchmarks.common import machine
    from sfddm_core import config
    from sfddm_core.io import write_json
    model_name = config.load(args.params).registry.model_name
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        trained = args.student.is_dir()
        student = args.student if trained else untrained_student(workdir / "student", args.params)
        tracking_uri = register_champion(student, workdir, model_name)
        from sfddm_core import models
        model = models.load_model(student)
        described = (f"{model.image_shape[1]}x{model.image_shape[2]}x{model.image_shape[0]} images, "
                     f"T' = {model.num_timesteps}, {sum(p.numel() for p in model.unet.parameters()):,} UNet parameters")
        with ScoringServer(tracking_uri, workdir, args.params) as url:
            load_before = os.getloadavg()[0]
            shapes = measure(url, args.requests, args.repeats)
            load_after = os.getloadavg()[0]
    # The server inherits this process's environment, so torch picks the same number of threads.
    result = {"machine": f"{len(os.sched_getaffinity(0))} cores; {machine(torch.device('cpu'))}; load average "
                         f"{load_before:.1f} before, {load_after:.1f} after (other processes on the cores slow "
                         "torch's threads)",
              "trained": trained,
              "model": described, "warmup": WARMUP_REQUESTS, "requests": args.requests, "repeats": args.repeats,
              "shapes": shapes}
    write_json(args.out / "bench" / "serving.json", result)
    benchmark_md = report.write(args.out)
    if args.results_page:
        report.update_results_page(args.results_page, benchmark_md)
    print(benchmark_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
