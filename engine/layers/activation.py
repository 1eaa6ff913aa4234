"""Gated activations. Caller: MLP blocks with a fused gate_up projection."""

from __future__ import annotations

import torch
from torch import nn

import kernels


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
        return kernels.silu_and_mul(gate_up)
