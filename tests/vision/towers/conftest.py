"""Helpers for the tower tests: HF vision towers (the oracle) with random weights of a
non-trivial scale, and random patch inputs for a batch of grids."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn


def _scramble(model: nn.Module, seed: int) -> None:
    """HF's init (std 0.02, unit norms, zero biases) makes attention nearly uniform and hides
    mistakes; draw weights so that logits are O(1) and norms/biases matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1 and ("norm" in name or "ln_q" in name) and name.endswith("weight"):
                param.copy_(1.0 + 0.3 * noise)
            elif param.dim() == 1:
                param.copy_(0.3 * noise)
            else:
                fan_in = param[0].numel()
                param.copy_(1.5 * noise / math.sqrt(fan_in))


@pytest.fixture
def hf_vision_tower():
    """hf_vision_tower(model_class, config, seed) -> eval-mode HF tower with scrambled weights."""

    def build(model_class, config, seed: int = 0):
        model = model_class._from_config(config, attn_implementation="eager", dtype=torch.float32)
        _scramble(model, seed)
        return model.eval()

    return build


@pytest.fixture
def patch_inputs():
    """patch_inputs(config, grids, seed) -> (pixel_values [N, C*T*P*P], grid_thw [num_items, 3])."""

    def make(config, grids: list[tuple[int, int, int]], seed: int = 0):
        grid_thw = torch.tensor(grids, dtype=torch.long)
        num_patches = int(grid_thw.prod(-1).sum())
        patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
        generator = torch.Generator().manual_seed(seed + 1000)
        return torch.randn(num_patches, patch_dim, generator=generator), grid_thw

    return make
