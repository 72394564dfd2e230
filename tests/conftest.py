import numpy as np
import pytest
import torch

from sfddm_core import diffusion, models
from sfddm_core.config import UNetConfig


def make_unet(seed: int = 0, channels: int = 1, size: int = 8):
    """A tiny random diffusers UNet2DModel (about 30k parameters) for fast CPU tests."""
    torch.manual_seed(seed)
    cfg = UNetConfig(block_out_channels=(8, 16), attention=(False, True), norm_num_groups=4)
    return models.build_unet(cfg, size, channels).eval()


@pytest.fixture
def unet():
    return make_unet()


@pytest.fixture
def linear_abar():
    return diffusion.alphas_cumprod(diffusion.beta_schedule("linear", 1000))
