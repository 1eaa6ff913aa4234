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

Tensor parallelism (a ParallelContext with tp_size > 1): the packed layers are column-parallel --
each rank holds its slice of every shard (q heads, its KV heads, I/tp rows of gate and of up),
cut from the checkpoint tensor as it is loaded -- and RowParallelLinear (o_proj, down_proj) holds
a slice of the input columns and all-reduces its output. No communication in between:

    x [T, H] -> QKV / gate_up (column slice) -> attention / SiLU on local heads / rows
             -> o_proj / down_proj (row slice) -> all-reduce -> [T, H] on every rank
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed.parallel_context import SINGLE_RANK, ParallelContext, kv_heads_of_rank

import vlserve_kernels as kernels


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

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 parallel: ParallelContext = SINGLE_RANK):
        # Sizes held by this rank; the checkpoint's shard i has output_sizes[i] * tp_size rows.
        self.output_sizes = [parallel.shard_size(size, "the merged projection's rows") for size in output_sizes]
        self.tp_rank, self.tp_size = parallel.tp_rank, parallel.tp_size
        super().__init__(input_size, sum(self.output_sizes), bias)
        for param in self.parameters():
            param.weight_loader = self.weight_loader
            param.shard_ids = tuple(range(len(output_sizes)))

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: int) -> None:
        start, size = sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id]
        _load_rows(param, _rank_rows(loaded_weight, self.tp_rank * size, size, size * self.tp_size), start, size)


class QKVLinear(Linear):
    """q, k and v projections fused along the output dim; any GQA ratio. Under TP this rank holds
    num_heads / tp query heads and its KV heads (kv_heads_of_rank: sharded, or replicated when
    tp_size > num_kv_heads); `num_heads` / `num_kv_heads` are this rank's counts."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, parallel: ParallelContext = SINGLE_RANK):
        self.num_heads = parallel.shard_size(num_heads, "num_attention_heads")
        first_kv_head, self.num_kv_heads = kv_heads_of_rank(num_kv_heads, parallel)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        # First checkpoint row of this rank's q / k / v slice.
        self.checkpoint_starts = {"q": parallel.tp_rank * self.q_size, "k": first_kv_head * head_dim,
                                  "v": first_kv_head * head_dim}
        self.checkpoint_rows = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias)
        for param in self.parameters():
            param.weight_loader = self.weight_loader
            param.shard_ids = ("q", "k", "v")

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str) -> None:
        starts = {"q": 0, "k": self.q_size, "v": self.q_size + self.kv_size}
        sizes = {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}
        if shard_id not in starts:
            raise ValueError(f"unknown qkv shard id {shard_id!r}")
        rows = _rank_rows(loaded_weight, self.checkpoint_starts[shard_id], sizes[shard_id],
                          self.checkpoint_rows[shard_id])
        _load_rows(param, rows, starts[shard_id], sizes[shard_id])

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class RowParallelLinear(Linear):
    """y = all_reduce(x_r @ W_r^T) (+ b): rank r holds input columns [r*in/tp, (r+1)*in/tp) of W and
    receives the matching slice of x (the local heads / intermediate rows); b is added once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 parallel: ParallelContext = SINGLE_RANK):
        self.parallel = parallel
        super().__init__(parallel.shard_size(input_size, "the row-parallel input size"), output_size, bias)
        self.weight.weight_loader = self._load_weight

    def _load_weight(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        width = param.shape[1]
        if loaded_weight.dim() != 2 or loaded_weight.shape[1] != width * self.parallel.tp_size:
            raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} x tp {self.parallel.tp_size} "
                             f"vs checkpoint {tuple(loaded_weight.shape)}")
        default_weight_loader(param, loaded_weight.narrow(1, self.parallel.tp_rank * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in / tp] -> [T, out]
        if self.bias is None or self.parallel.tp_size == 1:
            return self.parallel.all_reduce(super().forward(x))
        return self.parallel.all_reduce(F.linear(x, self.weight)) + self.bias


def _rank_rows(loaded_weight: torch.Tensor, start: int, num_rows: int, checkpoint_rows: int) -> torch.Tensor:
    """Rows [start, start + num_rows) of a checkpoint tensor of checkpoint_rows rows: this rank's
    slice (the whole tensor on one rank)."""
    if loaded_weight.dim() == 0 or loaded_weight.shape[0] != checkpoint_rows:
        raise ValueError(f"shard shape mismatch: expected {checkpoint_rows} checkpoint rows, "
                         f"got {tuple(loaded_weight.shape)}")
    return loaded_weight if num_rows == checkpoint_rows else loaded_weight.narrow(0, start, num_rows)
