"""Linear layers whose parameters know how to load themselves from checkpoint tensors.

Caller: model definitions (engine.models.*) build them; `engine.weights.load_named_weights`
calls each parameter's `weight_loader(param, loaded_weight, shard_id)`.

Packed layers fuse several checkpoint matrices into one matmul. Their output rows are laid out
back to back, and each parameter lists its `shard_ids` so the loader can check that every shard
arrived:

    QKVLinear.weight  [ (Hq + 2*Hkv) * D, in ]      MergedLinear.weight  [ sum(out_sizes), in ]
        rows [0, Hq*D)            <- q_proj              rows [0, I0)        <- shard 0 (gate_proj)
        rows [Hq*D, (Hq+Hkv)*D)   <- k_proj              rows [I0, I0+I1)    <- shard 1 (up_proj)
        rows [(Hq+Hkv)*D, ...)    <- v_proj
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    if param.shape != loaded_weight.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint "
                         f"{tuple(loaded_weight.shape)}")
    param.data.copy_(loaded_weight)


def _load_rows(param: nn.Parameter, loaded_weight: torch.Tensor, row_start: int, num_rows: int) -> None:
    if loaded_weight.shape[0] != num_rows or loaded_weight.shape[1:] != param.shape[1:]:
        raise ValueError(f"shard shape mismatch: expected ({num_rows}, {tuple(param.shape[1:])}) rows, "
                         f"got {tuple(loaded_weight.shape)}")
    param.data[row_start:row_start + num_rows].copy_(loaded_weight)


class Linear(nn.Module):
    """y = x @ W^T (+ b); the checkpoint holds W and b as they are."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    # Deterministic mode (set_batch_invariant): a row's result does not depend on how many rows
    # the step has (kernels.batch_invariant_linear instead of cuBLAS, which picks kernels by M).
    batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.batch_invariant:
            return kernels.batch_invariant_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def set_batch_invariant(model: nn.Module, enabled: bool) -> int:
    """Switch every layer with a `batch_invariant` flag (Linear, LMHead) in `model`; -> how many."""
    layers = [m for m in model.modules() if hasattr(type(m), "batch_invariant")]
    for layer in layers:
        layer.batch_invariant = enabled
    return len(layers)


class MergedLinear(Linear):
    """Several projections of the same input fused along the output dim (gate_up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)
        for param in self.parameters():
            param.weight_loader = self.weight_loader
            param.shard_ids = tuple(range(len(output_sizes)))

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int) -> None:
        start = sum(self.output_sizes[:shard_id])
        _load_rows(param, loaded_weight, start, self.output_sizes[shard_id])


class QKVLinear(Linear):
    """q, k and v projections fused along the output dim; any GQA ratio."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False):
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias)
        for param in self.parameters():
            param.weight_loader = self.weight_loader
            param.shard_ids = ("q", "k", "v")

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str) -> None:
        starts = {"q": 0, "k": self.q_size, "v": self.q_size + self.kv_size}
        sizes = {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}
        if shard_id not in starts:
            raise ValueError(f"unknown qkv shard id {shard_id!r}")
        _load_rows(param, loaded_weight, starts[shard_id], sizes[shard_id])

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
