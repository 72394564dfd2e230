"""A training step that is stopped while it holds a TrainJob deletes the job before its container is gone,
in the process tree that KFP on Argo gives it (read in their sources, not assumed):

- Argo's emissary is PID 1 of the step's main container. It starts the KFP launcher in a process group of
  its own (Setpgid) and forwards every signal it gets to that whole group (kill(-pgid)). It polls for its
  child's exit once a second and then exits, and the kernel kills whatever is left in the container.
- The KFP launcher (launcher_v2.go) runs the compiled command, `sh -ec '... python3 -m
  kfp.dsl.executor_main ...'`, as a plain child, relays its output, and has no signal handler. dash does
  not exec its last command, so python3 is sh's child, in the same group.
- KFP's "Terminate run" sets the workflow's activeDeadlineSeconds to 0, and Argo (v3.4 and later) sends
  SIGTERM to PID 1 of each running container (`argoexec kill 15 1`). A step timeout (the pod's
  activeDeadlineSeconds) makes the kubelet send it. Neither deletes the pod, so the TrainJob's
  ownerReference does not act; the step's own SIGTERM handler is what frees the GPUs.

So the handler gets SIGTERM together with sh and the launcher, which die at once, and has at most about a
second. Here: the pipeline's compiled command runs a component that waits on a TrainJob (the launcher's
own wait) against a Kubernetes API on loopback, under a stand-in for the KFP launcher, in a process group
of its own; the group gets SIGTERM and, a second later, SIGKILL. The API has seen the DELETE.
"""
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from kfp import dsl

from sfddm_runtime import trainjob
from sfddm_runtime.image import IMAGE

PIPELINE_YAML = Path(__file__).resolve().parents[1] / "pipelines" / "sfddm_pipeline.yaml"
JOB = "sfddm-distill-0123456789"
JOB_PATH = f"/apis/{trainjob.API_GROUP}/{trainjob.API_VERSION}/namespaces/kubeflow/{trainjob.PLURAL}/{JOB}"
EMISSARY_POLL_SECONDS = 1.0            # how long the container outlives the launcher, at most
# The KFP launcher's part: run the step's command with its output relayed, and die on SIGTERM (the
# default disposition; it installs no handler).
LAUNCHER = ("import subprocess, sys\n"
            "step = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)\n"
            "for line in step.stdout:\n"
            "    sys.stdout.buffer.write(line)\n"
            "    sys.stdout.flush()\n"
            "sys.exit(step.wait())\n")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def wait_on_trainjob(api_url: str, name: str):
    """A training step waiting for its TrainJob, as components/distill.py's launcher does."""
    from kubernetes import client

    from sfddm_runtime import launcher

    api = client.ApiClient(client.Configuration(host=api_url))
    jobs = launcher.TrainJobs("kubeflow", client.CustomObjectsApi(api), client.CoreV1Api(api))
    with launcher.deleting_on_stop(jobs, name):
        launcher.Launcher(jobs, poll_seconds=0.2).wait(name, timeout_seconds=3600)


class KubernetesApi(http.server.BaseHTTPRequestHandler):
    """The two reads of the launcher's wait (a Running TrainJob, no pods yet) and the DELETE; every
    request is recorded as (method, path) in the server's `requests`."""

    def _answer(self, body: dict) -> None:
        self.server.requests.append((self.command, self.path.split("?")[0]))
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.startswith("/api/v1/"):
            self._answer({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": []})
        else:
            self._answer({"metadata": {"name": JOB}, "status": {"conditions": []}})

    def do_DELETE(self):
        self._answer({"kind": "Status", "status": "Success"})

    def log_message(self, *args):
        pass


@pytest.fixture
def kubernetes_api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KubernetesApi)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def compiled_command(task: str) -> list[str]:
    pipeline = next(yaml.safe_load_all(PIPELINE_YAML.read_text()))       # then the platform spec
    return pipeline["deploymentSpec"]["executors"][f"exec-{task}"]["container"]["command"]


def test_component_runs_the_pipelines_compiled_command():
    """The component below is started exactly as the pipeline's training steps are."""
    command = wait_on_trainjob.component_spec.implementation.container.command
    assert command[:3] == compiled_command("distill")[:3] == compiled_command("train-teacher")[:3]
    assert command[:2] == ["sh", "-ec"] and "python3 -m kfp.dsl.executor_main" in command[2]


@pytest.mark.integration
def test_sigterm_to_the_steps_process_group_deletes_the_trainjob_before_the_container_is_gone(
        kubernetes_api, tmp_path):
    container = wait_on_trainjob.component_spec.implementation.container
    executor_input = {"inputs": {"parameterValues": {"api_url": f"http://127.0.0.1:{kubernetes_api.server_port}",
                                                     "name": JOB}},
                      "outputs": {"outputFile": str(tmp_path / "executor_output.json")}}
    args = ["--executor_input", json.dumps(executor_input), "--function_to_execute", "wait_on_trainjob"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    step = subprocess.Popen([sys.executable, "-c", LAUNCHER, *container.command, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while ("GET", JOB_PATH) not in kubernetes_api.requests:       # the step is waiting on its job
            assert step.poll() is None, step.stdout.read().decode()
            assert time.monotonic() < deadline, "the step never read its TrainJob"
            time.sleep(0.05)
        os.killpg(step.pid, signal.SIGTERM)           # the emissary's forwarding
        time.sleep(EMISSARY_POLL_SECONDS)
    finally:
        try:
            os.killpg(step.pid, signal.SIGKILL)       # the container is gone
        except ProcessLookupError:
            pass
        output = step.communicate()[0].decode()
    assert step.returncode == -signal.SIGTERM, output                 # the launcher died of the SIGTERM
    assert ("DELETE", JOB_PATH) in kubernetes_api.requests, output
