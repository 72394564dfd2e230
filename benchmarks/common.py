"""What several benchmarks share: the line naming the machine a measurement ran on."""
from __future__ import annotations

import platform

import torch


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads)"
    return f"{name}, torch {torch.__version__}, Python {platform.python_version()}"
