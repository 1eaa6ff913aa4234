"""Gated activations. Caller: MLP blocks with a fused gate_up projection."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.linear import MergedLinear

import vlserve_kernels as kernels


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
        return kernels.silu_and_mul(gate_up)

    def of_projection(self, gate_up_proj: MergedLinear, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, I]
        """self(gate_up_proj(x)). Deterministic mode: one launch that never writes the [T, 2I]
        product (kernels.batch_invariant_linear_silu_mul, the same bits). The projection's rows
        are [gate; up] on every rank (MergedLinear keeps that order for its slice of each)."""
        if len(gate_up_proj.output_sizes) != 2 or gate_up_proj.output_sizes[0] != gate_up_proj.output_sizes[1]:
            raise ValueError(f"gate_up projection sizes {gate_up_proj.output_sizes} are not [I, I]")
        if gate_up_proj.batch_invariant:
            return kernels.batch_invariant_linear_silu_mul(x, gate_up_proj.weight, gate_up_proj.bias)
        return self(gate_up_proj(x))
