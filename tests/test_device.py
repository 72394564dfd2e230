"""Device choice (sfddm_core.io.resolve_device): `device: auto` uses a GPU torch can use, else the CPU, but a
container that was given GPUs it cannot use (driver too old for torch's CUDA build, no driver mounted, GPUs
hidden) refuses with one line instead of training on the CPU. No GPU needed: torch's CUDA probes are
monkeypatched, raising the messages torch's own libc10_cuda.so carries."""
from pathlib import Path

import pytest
import torch

from sfddm_cli import cli
from sfddm_core import io
from sfddm_core.errors import ConfigError, SfddmError

ROOT = Path(__file__).resolve().parents[1]
GPU = "GPU-8a1f2c3d-0000-1111-2222-333344445555"
# c10/cuda/CUDAFunctions.cpp's messages, as torch.cuda.init() raises them (test_messages_are_torchs checks them)
TOO_OLD = ("The NVIDIA driver on your system is too old (found version 12040). Please update your GPU driver by "
           "downloading and installing a new version from the URL: http://www.nvidia.com/Download/index.aspx "
           "Alternatively, go to: https://pytorch.org to install a PyTorch version that has been compiled with "
           "your version of the CUDA driver.")
NO_GPUS = "No CUDA GPUs are available"


@pytest.fixture
def no_usable_cuda(monkeypatch, tmp_path):
    """torch 2.14.1+cu130 that finds no usable GPU, in a container without GPU device nodes (an empty
    `dev` folder); call the returned function with the error that torch.cuda.init() should raise (through
    torch's real _lazy_init)."""
    (tmp_path / "dev").mkdir()
    monkeypatch.setattr(io, "DEVICE_NODES", tmp_path / "dev")
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    for name in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)

    def init_raises(message):
        def cuda_init():
            raise RuntimeError(message)
        monkeypatch.setattr(torch._C, "_cuda_init", cuda_init)
    return init_raises


@pytest.mark.parametrize("grant", [None, "", "void", "none", "VOID"])
def test_auto_is_the_cpu_in_a_container_given_no_gpus(no_usable_cuda, monkeypatch, grant):
    no_usable_cuda(TOO_OLD)
    if grant is not None:
        monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", grant)
    assert io.gpus_given() == ""
    assert io.resolve_device("auto") == torch.device("cpu")


def test_auto_is_cuda_when_torch_can_use_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", f"{GPU},GPU-2")
    assert io.resolve_device("auto") == torch.device("cuda")
    assert io.resolve_device("cuda") == torch.device("cuda")


def test_a_driver_too_old_for_torchs_cuda_is_refused_with_one_line(no_usable_cuda, monkeypatch):
    no_usable_cuda(TOO_OLD)
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", GPU)
    with pytest.raises(SfddmError) as error:
        io.resolve_device("auto")
    assert str(error.value) == (
        f"device: auto in a container given GPUs (NVIDIA_VISIBLE_DEVICES={GPU}), but torch cannot use a GPU "
        "(The NVIDIA driver on your system is too old (found version 12040): the node's driver runs CUDA 12.4 "
        "at most; torch 2.14.1+cu130 is built for CUDA 13.0, which needs NVIDIA driver >= 580); refusing to fall "
        "back to the CPU (set device: cpu to train there on purpose)")
    # the CPU stays available on purpose
    assert io.resolve_device("cpu") == torch.device("cpu")


def test_gpus_hidden_by_cuda_visible_devices_are_named(no_usable_cuda, monkeypatch):
    no_usable_cuda(NO_GPUS)
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(SfddmError) as error:
        io.resolve_device("auto")
    message = str(error.value)
    assert "(NVIDIA_VISIBLE_DEVICES=0,1)" in message and "(No CUDA GPUs are available; torch" in message
    assert message.endswith("CUDA_VISIBLE_DEVICES='' limits what it sees); refusing to fall back to the CPU "
                            "(set device: cpu to train there on purpose)")


def test_the_volume_mounts_strategy_names_gpus_by_folder_entries(no_usable_cuda, monkeypatch, tmp_path):
    """The device plugin's deviceListStrategy volume-mounts: NVIDIA_VISIBLE_DEVICES is a folder, one entry per GPU."""
    no_usable_cuda(TOO_OLD)
    devices = tmp_path / "nvidia-container-devices"
    devices.mkdir()
    for name in (GPU, "GPU-2"):
        (devices / name).touch()
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", str(devices))
    assert io.gpus_given() == f"NVIDIA_VISIBLE_DEVICES=GPU-2,{GPU}"
    with pytest.raises(SfddmError, match=f"given GPUs \\(NVIDIA_VISIBLE_DEVICES=GPU-2,{GPU}\\)"):
        io.resolve_device("auto")


def test_gpus_injected_through_cdi_are_seen_by_their_device_nodes(no_usable_cuda, monkeypatch, tmp_path):
    """The GPU Operator's default since v25.10 (CDI): the GPUs' /dev/nvidia<N> nodes are injected and the
    toolkit's CDI spec sets NVIDIA_VISIBLE_DEVICES=void; the driver's other nodes name no GPU."""
    no_usable_cuda(TOO_OLD)
    dev = tmp_path / "dev"
    for name in ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset"):
        (dev / name).touch()
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "void")
    assert io.gpus_given() == "" and io.resolve_device("auto") == torch.device("cpu")
    for name in ("nvidia10", "nvidia2"):
        (dev / name).touch()
    assert io.gpus_given() == f"device nodes {dev / 'nvidia2'}, {dev / 'nvidia10'}"
    with pytest.raises(SfddmError, match=f"in a container given GPUs \\(device nodes {dev / 'nvidia2'}, "):
        io.resolve_device("auto")


def test_explicit_cuda_without_a_usable_gpu_names_the_reason(no_usable_cuda):
    no_usable_cuda(TOO_OLD)        # also where no GPUs were given: cuda was asked for
    with pytest.raises(ConfigError) as error:
        io.resolve_device("cuda")
    assert str(error.value) == (
        "device: cuda was asked for but torch cannot use a GPU (The NVIDIA driver on your system is too old "
        "(found version 12040): the node's driver runs CUDA 12.4 at most; torch 2.14.1+cu130 is built for CUDA "
        "13.0, which needs NVIDIA driver >= 580); use device: cpu, or run where torch can use a GPU")


def test_a_torch_built_without_cuda_says_so(no_usable_cuda, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "all")
    with pytest.raises(SfddmError, match=r"\(torch 2.14.1\+cu130 is built without CUDA\); refusing"):
        io.resolve_device("auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
def test_no_driver_on_this_machine_is_torchs_real_reason(monkeypatch):
    """Unpatched torch on a machine without an NVIDIA driver (a pod given GPUs by the device plugin but run
    without the NVIDIA container runtime looks the same): the reason is torch's own, on every call."""
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", GPU)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for _ in range(2):
        with pytest.raises(SfddmError) as error:
            io.resolve_device("auto")
        assert f"(Found no NVIDIA driver on your system; torch {torch.__version__} is built for CUDA" \
               in str(error.value)


def test_messages_are_torchs():
    """The messages the fixtures raise are the ones the installed torch carries (so that a torch upgrade that
    rewords them shows up here), and torch's CUDA build is the one the driver table covers."""
    library = (Path(torch.__file__).parent / "lib" / "libc10_cuda.so").read_bytes()
    assert TOO_OLD.split("12040")[0].encode() in library and TOO_OLD.split("12040")[1].encode() in library
    assert NO_GPUS.encode() in library
    assert torch.version.cuda.split(".")[0] in io.MIN_LINUX_DRIVER


def test_the_cli_prints_the_refusal_as_one_line_before_any_work(no_usable_cuda, monkeypatch, capsys, tmp_path):
    """A training stage refuses at its first step (joining the process group picks the device), before it
    reads data: `sfddm distill` in a GPU pod whose driver is too old."""
    no_usable_cuda(TOO_OLD)
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", GPU)
    monkeypatch.chdir(ROOT)
    status = cli.main(["distill", "--data", str(tmp_path / "absent"), "--teacher", str(tmp_path / "absent"),
                       "--out", str(tmp_path / "student")])
    [line] = capsys.readouterr().err.splitlines()
    assert status == 2 and line.startswith("sfddm distill: error: device: auto in a container given GPUs")
    assert "which needs NVIDIA driver >= 580" in line and not (tmp_path / "student").exists()


def test_sfddm_device_checks_the_device_with_a_product_on_it(no_usable_cuda, monkeypatch, capsys):
    """`sfddm device` (the GPU smoke test's command): a line on the device after a product there, or torch's
    reason as one line and exit status 2."""
    monkeypatch.chdir(ROOT)
    assert cli.main(["device", "--set", "device=cpu"]) == 0
    assert capsys.readouterr().out == "cpu: torch 2.14.1+cu130, a 256 x 256 matrix product checked\n"
    no_usable_cuda(TOO_OLD)
    assert cli.main(["device", "--set", "device=cuda"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("sfddm device: error: device: cuda was asked for but torch cannot use a GPU (The NVIDIA "
                           "driver on your system is too old (found version 12040)")
