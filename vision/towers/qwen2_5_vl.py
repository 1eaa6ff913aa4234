"""Qwen2.5-VL vision tower: the Qwen2-VL ViT with RMSNorm, a SwiGLU MLP, and window attention.

Caller: `engine.models.qwen2_5_vl`. Same contract as `Qwen2VisionTransformer`: one forward for all
items of a step, pixel_values [N_patches, C*T*P*P] + grid_thw [num_items, 3] ->
[N_patches / merge**2, out_hidden_size].

Window attention. Each frame's merge-unit grid (h/merge x w/merge units, each unit = merge**2
consecutive patch rows) is cut into windows of `window_size // merge // patch_size` units a side,
padding at the bottom/right edges only shortens the last windows. Before the first block the
units are reordered window by window, so every window is one contiguous attention segment:

    units of a 3x5 frame, windows of 2x2:      window order after the permutation:
     0  1 |  2  3 |  4                          [0 1 5 6] [2 3 7 8] [4 9] [10 11] [12 13] [14]
     5  6 |  7  8 |  9
    ------+-------+---                          cu_window_seqlens (in patches, merge 2):
    10 11 | 12 13 | 14                          0 16 32 40 48 56 60

Blocks in `fullatt_block_indexes` attend over whole frames instead; the permutation keeps every
frame contiguous, so the per-frame segments of Qwen2-VL still apply. The merger's outputs are
put back in processor order with the inverse permutation. This is transformers'
`get_vision_window_index`, computed once per distinct set of grids (cached).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import vlserve_kernels as kernels

from vision.towers.qwen2_vl import (
    GridKey,
    VisionAttention,
    VisionBlock,
    VisionPatchEmbed,
    VisionPatchMerger,
    VisionRotaryEmbedding,
    activation_fn,
    check_num_patches,
    grid_key,
    load_named_weights,
    qwen2_vl_layout,
    rope_theta_of,
)


class Qwen2_5_VisionRMSNorm(nn.Module):
    """HF Qwen2RMSNorm: normalised in fp32, cast back, then scaled by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, dim]
        return kernels.rms_norm(x, self.weight, self.eps)  # one Triton pass on CUDA, the same math on CPU

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), the add in the input dtype; one pass on CUDA."""
        return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)


class Qwen2_5_VisionBlock(VisionBlock):
    """VisionBlock whose second residual add is fused into norm2 (RMSNorm): same sums, one pass."""

    def forward(self, x, cu_seqlens, max_seqlen: int, cos, sin) -> torch.Tensor:  # [N, dim]
        attn_out = self.attn(self.norm1(x), cu_seqlens, max_seqlen, cos, sin)
        normed, x = self.norm2.add_and_norm(attn_out, x)  # x + attn_out, as VisionBlock adds it
        return x + self.mlp(normed)


# Hidden width of the tower MLP rounded up to this many elements (32-byte rows). At Qwen2.5-VL's
# 3420, rows of 6,840 bytes are only 8-byte aligned and cuBLAS falls back to sm80 "align2" kernels
# (H200, W1 profile: 0.96 s of 3.3 s of GPU time); at 3424 it takes its Hopper ones.
_MLP_WIDTH_ALIGN = 16


def _load_leading(param: nn.Parameter, loaded: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Checkpoint tensor of exactly `shape` -> the leading block of a zero-padded parameter."""
    if tuple(loaded.shape) != shape:
        raise ValueError(f"shape mismatch: expected {shape}, got {tuple(loaded.shape)}")
    param.zero_()
    param[tuple(slice(0, size) for size in shape)].copy_(loaded)


def _padded_linear(in_size: int, out_size: int, in_checkpoint: int, out_checkpoint: int) -> nn.Linear:
    """nn.Linear [out_size, in_size] (+ bias) loading a checkpoint's [out_checkpoint, in_checkpoint]
    into its leading block; the padding stays zero (dummy weights fill it with noise: harmless)."""
    linear = nn.Linear(in_size, out_size, bias=True)
    linear.weight.weight_loader = functools.partial(_load_leading, shape=(out_checkpoint, in_checkpoint))
    linear.bias.weight_loader = functools.partial(_load_leading, shape=(out_checkpoint,))
    return linear


class Qwen2_5_VisionMLP(nn.Module):
    """down(act(gate(x)) * up(x)), all three with bias. The hidden width is zero-padded to a
    multiple of _MLP_WIDTH_ALIGN: a padded unit is act(0 + 0) * 0 = 0 and adds exact zeros to
    down's sums, so the output is the unpadded one."""

    def __init__(self, dim: int, hidden_dim: int, hidden_act: str):
        super().__init__()
        width = -(-hidden_dim // _MLP_WIDTH_ALIGN) * _MLP_WIDTH_ALIGN
        self.gate_proj = _padded_linear(dim, width, dim, hidden_dim)
        self.up_proj = _padded_linear(dim, width, dim, hidden_dim)
        self.down_proj = _padded_linear(width, dim, hidden_dim, dim)
        self.down_proj.bias.weight_loader = functools.partial(_load_leading, shape=(dim,))
        self.act = activation_fn(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


@dataclass(frozen=True)
class WindowLayout:
    """Everything a Qwen2.5-VL forward needs besides the weights; depends only on the grids."""

    positions: torch.Tensor  # [N, 2] int64 (row, col) per patch, in WINDOW order
    cu_seqlens: torch.Tensor  # [num_frames + 1] int32, full-attention segments (window order keeps frames whole)
    max_seqlen: int
    cu_window_seqlens: torch.Tensor  # [num_windows + 1] int32
    max_window_seqlen: int
    window_index: torch.Tensor  # [N / merge**2] int64: window-order slot i holds processor-order unit window_index[i]
    reverse_index: torch.Tensor  # [N / merge**2] int64: argsort(window_index)
    num_patches: int


def _frame_windows(units_h: int, units_w: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Units of one frame in window order [units_h*units_w], and each window's unit count."""
    index = torch.arange(units_h * units_w).view(units_h, units_w)
    padded = F.pad(index, (0, (-units_w) % window, 0, (-units_h) % window), value=-1)
    windows_h, windows_w = padded.shape[0] // window, padded.shape[1] // window
    windows = padded.view(windows_h, window, windows_w, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    is_unit = windows >= 0  # [num_windows, window*window]
    return windows[is_unit], is_unit.sum(1).tolist()


def _window_order(grid: GridKey, merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """window_index over all items [N / merge**2], and the unit count of every window."""
    orders, window_units, offset = [], [], 0
    for t, h, w in grid:
        frame_order, frame_window_units = _frame_windows(h // merge, w // merge, window)
        units_per_frame = (h // merge) * (w // merge)
        for _ in range(t):
            orders.append(frame_order + offset)
            window_units.extend(frame_window_units)
            offset += units_per_frame
    return torch.cat(orders), window_units


@functools.lru_cache(maxsize=256)
def qwen2_5_vl_layout(grid: GridKey, merge: int, window: int, device: torch.device) -> WindowLayout:
    """`window` is in merge units (window_size // merge // patch_size). Tensors are shared, never mutate."""
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode
        return _build_qwen2_5_vl_layout(grid, merge, window, device)


def _build_qwen2_5_vl_layout(grid: GridKey, merge: int, window: int, device: torch.device) -> WindowLayout:
    full = qwen2_vl_layout(grid, merge, torch.device("cpu"))  # also validates the grids
    window_index, window_units = _window_order(grid, merge, window)
    unit = merge * merge
    positions = full.positions.view(-1, unit, 2)[window_index].view(-1, 2)
    window_lengths = [units * unit for units in window_units]
    cu_window_seqlens = torch.tensor([0] + window_lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return WindowLayout(
        positions=positions.to(device),
        cu_seqlens=full.cu_seqlens.to(device),
        max_seqlen=full.max_seqlen,
        cu_window_seqlens=cu_window_seqlens.to(device),
        max_window_seqlen=max(window_lengths),
        window_index=window_index.to(device),
        reverse_index=torch.argsort(window_index).to(device),
        num_patches=full.num_patches,
    )


class Qwen2_5_VisionTransformer(nn.Module):
    """pixel_values [N_patches, C*T*P*P] + grid_thw [num_items, 3] -> [N_patches / merge**2, out_hidden_size]."""

    def __init__(self, vision_config):
        super().__init__()
        dim, num_heads = vision_config.hidden_size, vision_config.num_heads
        self.spatial_merge_size = vision_config.spatial_merge_size
        self.window_units = vision_config.window_size // self.spatial_merge_size // vision_config.patch_size
        if self.window_units < 1:
            raise ValueError(
                f"vision_config.window_size={vision_config.window_size} is smaller than one merge unit "
                f"(spatial_merge_size * patch_size = {self.spatial_merge_size * vision_config.patch_size})"
            )
        self.fullatt_block_indexes = frozenset(vision_config.fullatt_block_indexes)
        self.patch_embed = VisionPatchEmbed(
            vision_config.in_channels, vision_config.temporal_patch_size, vision_config.patch_size, dim
        )
        self.rotary_pos_emb = VisionRotaryEmbedding(dim // num_heads, rope_theta_of(vision_config))
        self.blocks = nn.ModuleList(
            Qwen2_5_VisionBlock(
                attn=VisionAttention(dim, num_heads),
                mlp=Qwen2_5_VisionMLP(dim, vision_config.intermediate_size, vision_config.hidden_act),
                norm1=Qwen2_5_VisionRMSNorm(dim),
                norm2=Qwen2_5_VisionRMSNorm(dim),
            )
            for _ in range(vision_config.depth)
        )
        self.merger = VisionPatchMerger(
            dim, vision_config.out_hidden_size, self.spatial_merge_size, norm=Qwen2_5_VisionRMSNorm(dim)
        )

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """grid_thw is best kept on the CPU: it is read on the host (layout cache key)."""
        layout = qwen2_5_vl_layout(
            grid_key(grid_thw), self.spatial_merge_size, self.window_units, pixel_values.device
        )
        check_num_patches(pixel_values, layout.num_patches, self.patch_embed.proj.in_features)
        unit = self.spatial_merge_size**2
        hidden = self.patch_embed(pixel_values)  # [N, dim], processor order
        hidden = hidden.view(-1, unit, hidden.shape[-1])[layout.window_index].flatten(0, 1)  # window order
        cos, sin = self.rotary_pos_emb(layout.positions)  # [N, head_dim] each, window order
        for index, block in enumerate(self.blocks):
            if index in self.fullatt_block_indexes:
                hidden = block(hidden, layout.cu_seqlens, layout.max_seqlen, cos, sin)
            else:
                hidden = block(hidden, layout.cu_window_seqlens, layout.max_window_seqlen, cos, sin)
        merged = self.merger(hidden)  # [N / unit, out_hidden], window order
        return merged[layout.reverse_index]  # processor order

    def expected_weight_names(self) -> set[str]:
        return {name for name, _ in self.named_parameters()}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_named_weights(self, weights)
