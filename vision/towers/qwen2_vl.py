"""Qwen2-VL vision tower (ViT with 2D rotary, full attention per frame, 2x2 patch merger).

Caller: `engine.models.qwen2_vl` (and `vision.towers.qwen2_5_vl`, which reuses the patch embed,
rotary, attention, merger and weight loading defined here). One `forward` encodes every image
and video of a step at once: their patches are concatenated along dim 0 and `grid_thw` says
where each item starts.

Patch order (what transformers' processor emits, and what this tower assumes): within a frame,
patches come in spatial-merge blocks, so each run of merge**2 rows is one output token.

    frame of h=4, w=4 patches, merge 2:   rows  0 1 | 4 5        (block (0,0) = rows 0..3,
                                                2 3 | 6 7         block (0,1) = rows 4..7, ...)
                                                ----+----
                                                8 9 |12 13
                                               10 11|14 15

Parameter names are the checkpoint's names relative to the tower (transformers 5 stores them
under `model.visual.`, older checkpoints under `visual.`; the caller strips either prefix), so the
name map of `load_weights` is the identity plus per-parameter `weight_loader`s for reshapes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import vlserve_kernels as kernels
from vision.attention import varlen_attention

GridKey = tuple[tuple[int, int, int], ...]  # one (t, h, w) per item, in patches


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' ACT2FN semantics for the activations vision configs use."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"vision_config.hidden_act={name!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def rope_theta_of(vision_config) -> float:
    rope_parameters = getattr(vision_config, "rope_parameters", None) or {}
    return float(rope_parameters.get("rope_theta", 10000.0))


class VisionPatchEmbed(nn.Module):
    """Conv3d with kernel == stride == one patch, done as one matmul over flattened patches.

    The checkpoint's Conv3d weight [embed, C, T, P, P] flattens to [embed, C*T*P*P] in the same
    (c, t, p, q) order as the processor flattens a patch, so the two are the same sum."""

    def __init__(self, in_channels: int, temporal_patch_size: int, patch_size: int, embed_dim: int,
                 bias: bool = False):
        super().__init__()
        self.conv_shape = (embed_dim, in_channels, temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Linear(in_channels * temporal_patch_size * patch_size**2, embed_dim, bias=bias)
        self.proj.weight.weight_loader = self._load_conv_weight

    def _load_conv_weight(self, param: nn.Parameter, conv_weight: torch.Tensor) -> None:
        if tuple(conv_weight.shape) != self.conv_shape:
            raise ValueError(f"patch_embed.proj.weight: expected {self.conv_shape}, got {tuple(conv_weight.shape)}")
        param.data.copy_(conv_weight.reshape(param.shape))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [N, C*T*P*P] -> [N, embed]
        return self.proj(pixel_values.to(self.proj.weight.dtype))


class VisionRotaryEmbedding(nn.Module):
    """Axial 2D RoPE: the first half of each rotary pair rotates with the patch row, the second
    with the patch column, using the same head_dim/4 frequencies for both axes."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"vision head_dim={head_dim} must be a multiple of 4 for 2D rotary")
        axis_dim = head_dim // 2
        # Computed on the CPU like transformers does, and kept as a plain fp32 attribute: a buffer
        # would be cast by `tower.to(torch.bfloat16)`, and bf16 frequencies are visibly wrong.
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float) / axis_dim))  # [head_dim/4]

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [N, 2] (row, col) -> cos, sin [N, head_dim] in fp32
        inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv_freq  # [N, 2, head_dim/4]
        freqs = freqs.flatten(1)  # [N, head_dim/2]: row freqs then col freqs
        angles = torch.cat([freqs, freqs], dim=-1)  # [N, head_dim]
        return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_vision_rotary(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [N, H, D]; cos, sin [N, D] fp32 (both halves equal). Rotated in fp32, returned in the
    input dtype. On CUDA one fused kernel: the per-token table [N, D] (cos | sin of the D/2
    frequencies) is the kernel's cos_sin_cache and token n reads row n (same fp32 arithmetic)."""
    if kernels.uses_triton(q):
        half = cos.shape[-1] // 2
        table = torch.cat([cos[:, :half], sin[:, :half]], dim=-1)  # [N, D] fp32
        token_rows = torch.arange(q.shape[0], device=q.device)  # [N]
        return kernels.apply_rotary(q, k, token_rows, table)
    cos, sin = cos[:, None, :], sin[:, None, :]
    q_out = q.float() * cos + _rotate_half(q.float()) * sin
    k_out = k.float() * cos + _rotate_half(k.float()) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"vision hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, cu_seqlens, max_seqlen: int, cos, sin) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv(x).view(num_tokens, 3, self.num_heads, self.head_dim)  # [N, 3, H, D]
        q, k, v = qkv.unbind(1)
        q, k = apply_vision_rotary(q, k, cos, sin)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen)  # [N, H, D]
        return self.proj(out.reshape(num_tokens, -1))


class Qwen2VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = activation_fn(hidden_act)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer block; the tower decides the norm and MLP kinds."""

    def __init__(self, attn: VisionAttention, mlp: nn.Module, norm1: nn.Module, norm2: nn.Module):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp

    def forward(self, x, cu_seqlens, max_seqlen: int, cos, sin) -> torch.Tensor:  # [N, dim]
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen, cos, sin)
        return x + self.mlp(self.norm2(x))


class VisionPatchMerger(nn.Module):
    """norm, then each merge**2 consecutive rows concatenated -> MLP -> one LM token."""

    def __init__(self, context_dim: int, out_dim: int, spatial_merge_size: int, norm: nn.Module):
        super().__init__()
        self.merged_dim = context_dim * spatial_merge_size**2
        self.ln_q = norm
        # Sequential so the parameter names are the checkpoint's mlp.0 / mlp.2
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(), nn.Linear(self.merged_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, context] -> [N / merge**2, out]
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))


@dataclass(frozen=True)
class VisionLayout:
    """Per-step token bookkeeping that depends only on the items' grids (cached per grid)."""

    positions: torch.Tensor  # [N, 2] int64 (row, col) of each patch, in processor order
    cu_seqlens: torch.Tensor  # [num_frames + 1] int32: one attention segment per frame
    max_seqlen: int
    num_patches: int


def grid_key(grid_thw: torch.Tensor) -> GridKey:
    """[num_items, 3] tensor -> hashable tuple; checks the grids."""
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must be [num_items, 3], got {tuple(grid_thw.shape)}")
    key = tuple((int(t), int(h), int(w)) for t, h, w in grid_thw.tolist())
    if not key or any(min(item) <= 0 for item in key):
        raise ValueError(f"grid_thw needs at least one item and positive t, h, w, got {key}")
    return key


def _frame_positions(h: int, w: int, merge: int) -> torch.Tensor:  # [h*w, 2]
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    blocks = [p.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten() for p in (rows, cols)]
    return torch.stack(blocks, dim=-1)


@functools.lru_cache(maxsize=256)
def qwen2_vl_layout(grid: GridKey, merge: int, device: torch.device) -> VisionLayout:
    """Rotary positions and per-frame attention segments; tensors are shared, never mutate."""
    with torch.inference_mode(False):  # cached: must stay usable outside inference mode
        return _build_qwen2_vl_layout(grid, merge, device)


def _build_qwen2_vl_layout(grid: GridKey, merge: int, device: torch.device) -> VisionLayout:
    for t, h, w in grid:
        if h % merge or w % merge:
            raise ValueError(f"grid_thw item {(t, h, w)}: h and w must be multiples of spatial_merge_size={merge}")
    positions = torch.cat([_frame_positions(h, w, merge).repeat(t, 1) for t, h, w in grid])
    frame_lengths = [h * w for t, h, w in grid for _ in range(t)]
    cu_seqlens = torch.tensor([0] + frame_lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return VisionLayout(
        positions=positions.to(device),
        cu_seqlens=cu_seqlens.to(device),
        max_seqlen=max(frame_lengths),
        num_patches=len(positions),
    )


def check_num_patches(pixel_values: torch.Tensor, num_patches: int, patch_dim: int) -> None:
    if tuple(pixel_values.shape) != (num_patches, patch_dim):
        raise ValueError(
            f"pixel_values must be [sum(t*h*w)={num_patches}, C*T*P*P={patch_dim}] for this grid_thw, "
            f"got {tuple(pixel_values.shape)}"
        )


def load_named_weights(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Copy (name, tensor) pairs into the parameters of the same name; raises ValueError on an
    unknown name or a wrong shape. Returns the names loaded (the caller checks completeness
    against `expected_weight_names`)."""
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        param = params.get(name)
        if param is None:
            raise ValueError(f"unexpected vision tower weight {name!r} for {type(module).__name__}")
        loader = getattr(param, "weight_loader", None)
        with torch.no_grad():
            if loader is not None:
                loader(param, tensor)
            elif tensor.shape != param.shape:
                raise ValueError(f"{name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
            else:
                param.copy_(tensor)
        loaded.add(name)
    return loaded


class Qwen2VisionTransformer(nn.Module):
    """pixel_values [N_patches, C*T*P*P] + grid_thw [num_items, 3] -> [N_patches / merge**2, out_hidden]."""

    def __init__(self, vision_config):
        super().__init__()
        embed_dim, num_heads = vision_config.embed_dim, vision_config.num_heads
        self.spatial_merge_size = vision_config.spatial_merge_size
        self.patch_embed = VisionPatchEmbed(
            vision_config.in_channels, vision_config.temporal_patch_size, vision_config.patch_size, embed_dim
        )
        self.rotary_pos_emb = VisionRotaryEmbedding(embed_dim // num_heads, rope_theta_of(vision_config))
        mlp_dim = int(embed_dim * vision_config.mlp_ratio)
        self.blocks = nn.ModuleList(
            VisionBlock(
                attn=VisionAttention(embed_dim, num_heads),
                mlp=Qwen2VisionMLP(embed_dim, mlp_dim, vision_config.hidden_act),
                norm1=nn.LayerNorm(embed_dim, eps=1e-6),
                norm2=nn.LayerNorm(embed_dim, eps=1e-6),
            )
            for _ in range(vision_config.depth)
        )
        self.merger = VisionPatchMerger(
            embed_dim, vision_config.hidden_size, self.spatial_merge_size, norm=nn.LayerNorm(embed_dim, eps=1e-6)
        )

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """grid_thw is best kept on the CPU: it is read on the host (layout cache key)."""
        layout = qwen2_vl_layout(grid_key(grid_thw), self.spatial_merge_size, pixel_values.device)
        check_num_patches(pixel_values, layout.num_patches, self.patch_embed.proj.in_features)
        hidden = self.patch_embed(pixel_values)  # [N, embed]
        cos, sin = self.rotary_pos_emb(layout.positions)  # [N, head_dim] each
        for block in self.blocks:
            hidden = block(hidden, layout.cu_seqlens, layout.max_seqlen, cos, sin)
        return self.merger(hidden)  # [N / merge**2, out_hidden]

    def expected_weight_names(self) -> set[str]:
        return {name for name, _ in self.named_parameters()}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_named_weights(self, weights)
