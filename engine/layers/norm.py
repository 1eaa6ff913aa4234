"""RMSNorm (Qwen2 semantics: normalise in float32, cast back, then scale), optionally fused
with the residual add that precedes it. Caller: decoder layers of the language models."""

from __future__ import annotations

import torch
from torch import nn

import vlserve_kernels as kernels
from engine.layers.linear import RowParallelLinear, default_weight_loader


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [T, H] -> normed [T, H]; with residual [T, H]: (norm(x + residual), x + residual)."""
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)

    def of_projection(self, projection: RowParallelLinear, x: torch.Tensor, residual: torch.Tensor):
        """self(projection(x), residual): x [T, in] -> (normed [T, H], new residual [T, H]).
        Deterministic mode on one rank: kernels.batch_invariant_linear_add_rms_norm (the same bits;
        at small M the product's K-range sum also adds and normalises, one launch fewer)."""
        if projection.batch_invariant and projection.parallel.tp_size == 1:
            return kernels.batch_invariant_linear_add_rms_norm(x, projection.weight, projection.bias, residual,
                                                               self.weight, self.eps)
        return self(projection(x), residual)
