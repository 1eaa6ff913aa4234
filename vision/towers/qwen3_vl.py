"""Qwen3-VL vision tower: a ViT with patch 16, learned position embeddings resampled to each grid
plus 2D rotary, LayerNorm, a GELU(tanh) MLP, full attention per frame, and DeepStack mergers.

Caller: `engine.models.qwen3_vl`. Same batching contract as `Qwen2VisionTransformer` (one forward
for every item of a step; patches in spatial-merge-block order, see vision/towers/qwen2_vl.py),
but the output row of a merged token is wider:

    [N_patches / merge**2, out_hidden * (1 + k)] = [ merger(last block) | ds_0 | ... | ds_{k-1} ]

where ds_j = deepstack_merger_list[j](output of block deepstack_visual_indexes[j]); the language
model adds ds_j to the hidden state after its decoder layer j (engine.models.qwen3).

Position embeddings: `pos_embed` is a side x side table (side = sqrt(num_position_embeddings)),
bilinearly resampled (align_corners=True) to each frame's h x w patch grid, i.e. four taps per
patch: transformers' `get_vision_interpolation_indices_and_weights`, computed once per grid set.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vision.towers.qwen2_vl import (
    GridKey,
    VisionAttention,
    VisionBlock,
    VisionPatchEmbed,
    VisionRotaryEmbedding,
    activation_fn,
    check_num_patches,
    grid_key,
    load_named_weights,
    qwen2_vl_layout,
    rope_theta_of,
)


class Qwen3VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, hidden_act: str):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.linear_fc2 = nn.Linear(hidden_dim, dim, bias=True)
        self.act = activation_fn(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, dim]
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Qwen3VisionPatchMerger(nn.Module):
    """merge**2 consecutive rows -> one LM token: LayerNorm (per patch, or over the concatenated
    rows for the DeepStack mergers: `postshuffle_norm`), then fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, out_dim: int, merge: int, postshuffle_norm: bool):
        super().__init__()
        self.merged_dim = dim * merge**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged_dim if postshuffle_norm else dim, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged_dim, self.merged_dim)
        self.act = nn.GELU()
        self.linear_fc2 = nn.Linear(self.merged_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, dim] -> [N / merge**2, out_dim]
        x = self.norm(x.view(-1, self.merged_dim)) if self.postshuffle_norm else self.norm(x).view(-1, self.merged_dim)
        return self.linear_fc2(self.act(self.linear_fc1(x)))


@dataclass(frozen=True)
class Qwen3VisionLayout:
    positions: torch.Tensor      # [N, 2] int64 (row, col) per patch, processor order
    cu_seqlens: torch.Tensor     # [num_frames + 1] int32: one attention segment per frame
    max_seqlen: int
    num_patches: int
    pos_indices: torch.Tensor    # [N, 4] int64 rows of pos_embed (bilinear taps)
    pos_weights: torch.Tensor    # [N, 4] float32 tap weights


def _axis_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear align_corners=True taps of `index` on an axis of `size` into `side` table rows:
    ([N, 2] rows, [N, 2] weights), the float32 arithmetic of transformers' helper."""
    index = index.to(torch.float32)
    src = index * (side - 1) / torch.clamp(size - 1, min=1)
    floor = torch.floor(src)
    offsets = torch.arange(0, 2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def _position_taps(positions: torch.Tensor, grid: GridKey, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [N, 2] (row, col) -> ([N, 4] indices, [N, 4] weights) into the side x side table."""
    heights = torch.cat([torch.full((t * h * w,), h) for t, h, w in grid])  # [N] int64
    widths = torch.cat([torch.full((t * h * w,), w) for t, h, w in grid])
    row_taps, row_weights = _axis_taps(positions[:, 0], heights, side)
    col_taps, col_weights = _axis_taps(positions[:, 1], widths, side)
    indices = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
    return indices, weights


@functools.lru_cache(maxsize=256)
def qwen3_vl_layout(grid: GridKey, merge: int, side: int, device: torch.device) -> Qwen3VisionLayout:
    """Rotary positions, per-frame segments and position-embedding taps; tensors are shared, never mutate."""
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode
        full = qwen2_vl_layout(grid, merge, torch.device("cpu"))  # also validates the grids
        indices, weights = _position_taps(full.positions, grid, side)
        return Qwen3VisionLayout(positions=full.positions.to(device), cu_seqlens=full.cu_seqlens.to(device),
                                 max_seqlen=full.max_seqlen, num_patches=full.num_patches,
                                 pos_indices=indices.to(device), pos_weights=weights.to(device))


class Qwen3VisionTransformer(nn.Module):
    """pixel_values [N_patches, C*T*P*P] + grid_thw [num_items, 3] -> [N_patches / merge**2, out * (1 + k)]."""

    def __init__(self, vision_config):
        super().__init__()
        dim, num_heads = vision_config.hidden_size, vision_config.num_heads
        self.spatial_merge_size = vision_config.spatial_merge_size
        self.num_grid_per_side = math.isqrt(vision_config.num_position_embeddings)
        if self.num_grid_per_side**2 != vision_config.num_position_embeddings:
            raise ValueError(f"vision_config.num_position_embeddings={vision_config.num_position_embeddings} "
                             f"must be a square (a side x side table)")
        self.deepstack_visual_indexes = [int(i) for i in vision_config.deepstack_visual_indexes]
        if any(not 0 <= i < vision_config.depth for i in self.deepstack_visual_indexes):
            raise ValueError(f"vision_config.deepstack_visual_indexes {self.deepstack_visual_indexes} must be "
                             f"tower blocks (depth {vision_config.depth})")
        self.patch_embed = VisionPatchEmbed(vision_config.in_channels, vision_config.temporal_patch_size,
                                            vision_config.patch_size, dim, bias=True)
        self.pos_embed = nn.Embedding(vision_config.num_position_embeddings, dim)
        self.rotary_pos_emb = VisionRotaryEmbedding(dim // num_heads, rope_theta_of(vision_config))
        self.blocks = nn.ModuleList(
            VisionBlock(attn=VisionAttention(dim, num_heads),
                        mlp=Qwen3VisionMLP(dim, vision_config.intermediate_size, vision_config.hidden_act),
                        norm1=nn.LayerNorm(dim, eps=1e-6), norm2=nn.LayerNorm(dim, eps=1e-6))
            for _ in range(vision_config.depth))
        out_dim = vision_config.out_hidden_size
        self.merger = Qwen3VisionPatchMerger(dim, out_dim, self.spatial_merge_size, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            Qwen3VisionPatchMerger(dim, out_dim, self.spatial_merge_size, postshuffle_norm=True)
            for _ in self.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """grid_thw is best kept on the CPU: it is read on the host (layout cache key)."""
        layout = qwen3_vl_layout(grid_key(grid_thw), self.spatial_merge_size, self.num_grid_per_side,
                                 pixel_values.device)
        check_num_patches(pixel_values, layout.num_patches, self.patch_embed.proj.in_features)
        hidden = self.patch_embed(pixel_values)                                        # [N, dim]
        taps = self.pos_embed(layout.pos_indices)                                      # [N, 4, dim]
        hidden = hidden + (taps * layout.pos_weights[:, :, None]).sum(1).to(hidden.dtype)
        cos, sin = self.rotary_pos_emb(layout.positions)                               # [N, head_dim] each
        deepstack = []
        for index, block in enumerate(self.blocks):
            hidden = block(hidden, layout.cu_seqlens, layout.max_seqlen, cos, sin)
            if index in self.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.deepstack_visual_indexes.index(index)]
                deepstack.append(merger(hidden))                                       # [N / merge**2, out]
        return torch.cat([self.merger(hidden)] + deepstack, dim=-1)                     # [N / merge**2, out*(1+k)]

    def expected_weight_names(self) -> set[str]:
        return {name for name, _ in self.named_parameters()}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_named_weights(self, weights)
