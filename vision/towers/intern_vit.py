"""InternViT + pixel shuffle + `mlp1` projector: InternVL's vision side, tiles in, LM rows out.

Caller: `engine.models.internvl`. One `forward` encodes every tile of a step: the tiles of all
images (each image is its dynamic-resolution tiles plus a thumbnail) and all video frames (one
tile each) are stacked along dim 0; `grid_thw` holds (num_tiles, 1, 1) per item, in order.

Per tile of S x S pixels, patch P, downsample ratio r (0.5 in every InternVL2.5):

    pixels [3, S, S] -> conv patch embed -> [(S/P)^2, D], prepend the class token, add the
    absolute position embeddings (bicubically interpolated when the grid differs from the
    checkpoint's) -> L pre-norm blocks with layer scale (x + ls1 * attn(norm1 x), then MLP) ->
    drop the class token -> [S/P, S/P, D] -> pixel shuffle -> [(S/P * r)^2, D / r^2]
    -> mlp1 (LayerNorm, Linear, GELU, Linear) -> [(S/P * r)^2, llm_hidden]

Parameter names are the original (OpenGVLab) checkpoint's, relative to `vision_model.` for the ViT
and `mlp1.` for the projector; `HF_NATIVE_RENAMES` maps transformers' InternVL names onto them
(q/k/v projections load as shards of the fused `attn.qkv`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vision.attention import varlen_attention
from vision.towers.qwen2_vl import activation_fn

_NORM_TYPES = ("layer_norm", "rms_norm")


def _pair(value: Any) -> int:
    """image_size / patch_size: an int or a square (h, w) pair -> the int."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"vision_config: only square sizes are supported, got {list(value)}")
        return int(value[0])
    return int(value)


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class InternViTConfig:
    """The ViT and projector settings, from either layout's config (see `from_configs`)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    llm_hidden_size: int
    num_channels: int = 3
    qkv_bias: bool = True
    qk_norm: bool = False
    norm_type: str = "layer_norm"
    norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    final_norm: bool = False        # transformers' use_mean_pooling=False: LayerNorm after the last layer
    downsample_ratio: float = 0.5
    ps_version: str = "v2"          # "v1": the original pixel shuffle without its last transpose
    select_layer: int = -1          # which layer's output feeds the projector (-1: the last)
    projector_act: str = "gelu"

    def __post_init__(self) -> None:
        if self.norm_type not in _NORM_TYPES:
            raise ValueError(f"vision_config.norm_type={self.norm_type!r}: expected one of {_NORM_TYPES}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision_config.hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_heads}")
        if self.ps_version not in ("v1", "v2"):
            raise ValueError(f"ps_version={self.ps_version!r}: expected 'v1' or 'v2'")
        scale = round(1 / self.downsample_ratio)
        if abs(scale * self.downsample_ratio - 1) > 1e-6 or self.grid_size % scale:
            raise ValueError(f"downsample_ratio={self.downsample_ratio} must be 1/k with k dividing "
                             f"image_size/patch_size={self.grid_size}")
        if not -self.num_layers - 1 <= self.select_layer <= self.num_layers:
            raise ValueError(f"select_layer / vision_feature_layer={self.select_layer} is out of range "
                             f"for {self.num_layers} layers")

    @property
    def grid_size(self) -> int:  # patches per tile side
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:  # InternVL's num_image_token
        return int(self.grid_size * self.downsample_ratio) ** 2

    @property
    def num_layers_run(self) -> int:
        """Layers whose output is used: hidden_states[select_layer] is the output of this many."""
        return self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer

    @classmethod
    def from_configs(cls, vision_config: Any, llm_hidden_size: int, *, downsample_ratio: float,
                     select_layer: int = -1, ps_version: str = "v2", projector_act: str = "gelu",
                     image_size: int | None = None) -> "InternViTConfig":
        """vision_config: transformers' InternVLVisionConfig or the original InternVisionConfig
        (object or dict); both attribute spellings are read."""
        strategy = _get(vision_config, "vision_feature_select_strategy", default="default")
        if strategy != "default":
            raise ValueError(f"vision_feature_select_strategy={strategy!r} is not supported (only 'default')")
        return cls(
            hidden_size=int(_get(vision_config, "hidden_size")),
            num_layers=int(_get(vision_config, "num_hidden_layers")),
            num_heads=int(_get(vision_config, "num_attention_heads")),
            intermediate_size=int(_get(vision_config, "intermediate_size")),
            image_size=_pair(image_size or _get(vision_config, "image_size")),
            patch_size=_pair(_get(vision_config, "patch_size")),
            llm_hidden_size=int(llm_hidden_size),
            num_channels=int(_get(vision_config, "num_channels", default=3)),
            qkv_bias=bool(_get(vision_config, "attention_bias", "qkv_bias", default=False)),
            qk_norm=bool(_get(vision_config, "use_qk_norm", "qk_normalization", default=False)),
            norm_type=str(_get(vision_config, "norm_type", default="layer_norm")),
            norm_eps=float(_get(vision_config, "layer_norm_eps", default=1e-6)),
            hidden_act=str(_get(vision_config, "hidden_act", default="gelu")),
            final_norm=not bool(_get(vision_config, "use_mean_pooling", default=True)),
            downsample_ratio=float(downsample_ratio), ps_version=ps_version,
            select_layer=int(select_layer), projector_act=projector_act)


class InternRMSNorm(nn.Module):
    """transformers' InternVLVisionRMSNorm: normalise in fp32, cast back, then scale."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _norm(config: InternViTConfig) -> nn.Module:
    if config.norm_type == "rms_norm":
        return InternRMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: InternViTConfig):
        super().__init__()
        dim, patch = config.hidden_size, config.patch_size
        self.grid_size = config.grid_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid_size**2 + 1, dim))

    def _patch_positions(self, grid_h: int, grid_w: int) -> torch.Tensor:  # [1, grid_h*grid_w, D]
        table = self.position_embedding[:, 1:]
        if (grid_h, grid_w) == (self.grid_size, self.grid_size):
            return table
        dim = table.shape[-1]
        grid = table.float().reshape(1, self.grid_size, self.grid_size, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(table.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_tiles, C, H, W] -> [num_tiles, 1 + (H/P)*(W/P), D]"""
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # [n, D, H/P, W/P]
        num_tiles, _, grid_h, grid_w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # [n, (H/P)*(W/P), D]
        tokens = torch.cat([self.class_embedding.to(dtype).expand(num_tiles, 1, -1), patches], dim=1)
        positions = torch.cat([self.position_embedding[:, :1], self._patch_positions(grid_h, grid_w)], dim=1)
        return tokens + positions.to(dtype)


class InternAttention(nn.Module):
    """Fused qkv (the original layout; transformers' q/k/v_proj load as its shards), optional
    RMS QK-norm over all heads at once, non-causal attention within each tile."""

    def __init__(self, config: InternViTConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, dim // config.num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        for param in self.qkv.parameters():
            param.weight_loader = _qkv_shard_loader
        self.q_norm = InternRMSNorm(dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = InternRMSNorm(dim, config.norm_eps) if config.qk_norm else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [N, D] each, heads back to back
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(num_tokens, self.num_heads, self.head_dim) for t in (q, k, v))
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen)  # [N, H, Dh]
        return self.proj(out.reshape(num_tokens, -1))


def _qkv_shard_loader(param: nn.Parameter, tensor: torch.Tensor, shard: int | None = None) -> None:
    """shard None: the fused original `qkv`; 0/1/2: transformers' q_proj / k_proj / v_proj."""
    rows = param.shape[0] // 3
    target = param.data if shard is None else param.data[shard * rows:(shard + 1) * rows]
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(f"attention qkv shard {shard}: expected {tuple(target.shape)}, got {tuple(tensor.shape)}")
    target.copy_(tensor)


class InternMLP(nn.Module):
    def __init__(self, config: InternViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation_fn(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    """x + ls1 * attn(norm1(x)), then + ls2 * mlp(norm2(x)); ls1/ls2 are per-channel layer scales."""

    def __init__(self, config: InternViTConfig):
        super().__init__()
        self.norm1, self.attn = _norm(config), InternAttention(config)
        self.norm2, self.mlp = _norm(config), InternMLP(config)
        self.ls1 = nn.Parameter(torch.ones(config.hidden_size))
        self.ls2 = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x), cu_seqlens, max_seqlen)  # [N, D]
        return x + self.ls2 * self.mlp(self.norm2(x))


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config) for _ in range(config.num_layers_run))


class InternVisionModel(nn.Module):
    """The ViT alone: tiles [n, C, S, S] -> features [n, 1 + (S/P)^2, D] of layer `select_layer`."""

    def __init__(self, config: InternViTConfig):
        super().__init__()
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        # Only when the last layer is selected does transformers apply its final LayerNorm.
        use_final_norm = config.final_norm and config.num_layers_run == config.num_layers
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps) if use_final_norm else None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(pixel_values)  # [n, L, D]
        num_tiles, seq_len, dim = hidden.shape
        cu_seqlens = torch.arange(0, (num_tiles + 1) * seq_len, seq_len, dtype=torch.int32,
                                  device=hidden.device)  # one attention segment per tile
        flat = hidden.reshape(num_tiles * seq_len, dim)
        for layer in self.encoder.layers:
            flat = layer(flat, cu_seqlens, seq_len)
        if self.layernorm is not None:
            flat = self.layernorm(flat)
        return flat.view(num_tiles, seq_len, dim)


def pixel_shuffle(features: torch.Tensor, scale: float, ps_version: str = "v2") -> torch.Tensor:
    """InternVL's space-to-depth, exactly as the original `pixel_shuffle` (and transformers'):
    [n, w, h, c] -> [n, w*scale, h*scale, c/scale^2] (v1 leaves the two spatial axes swapped)."""
    n, w, h, c = features.shape
    x = features.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x if ps_version == "v1" else x.permute(0, 2, 1, 3).contiguous()


def projector(config: InternViTConfig) -> nn.Sequential:
    """mlp1: indices 0, 1, 3 are the original checkpoint's parameter names."""
    in_dim = config.hidden_size * round(1 / config.downsample_ratio) ** 2
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, config.llm_hidden_size),
                         _Activation(config.projector_act), nn.Linear(config.llm_hidden_size, config.llm_hidden_size))


class _Activation(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        self.fn = activation_fn(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


# transformers' InternVLForConditionalGeneration names (relative to model.vision_tower. /
# model.multi_modal_projector.) -> ours. Each entry: regex, replacement, qkv shard (or None).
HF_NATIVE_RENAMES: tuple[tuple[str, str, int | None], ...] = (
    (r"^vision_tower\.embeddings\.cls_token$", "vision_model.embeddings.class_embedding", None),
    (r"^vision_tower\.embeddings\.position_embeddings$", "vision_model.embeddings.position_embedding", None),
    (r"^vision_tower\.embeddings\.patch_embeddings\.projection\.", "vision_model.embeddings.patch_embedding.", None),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.attention\.q_proj\.", r"vision_model.encoder.layers.\1.attn.qkv.", 0),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.attention\.k_proj\.", r"vision_model.encoder.layers.\1.attn.qkv.", 1),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.attention\.v_proj\.", r"vision_model.encoder.layers.\1.attn.qkv.", 2),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.attention\.projection_layer\.",
     r"vision_model.encoder.layers.\1.attn.proj.", None),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.attention\.([qk]_norm)\.", r"vision_model.encoder.layers.\1.attn.\2.",
     None),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.layernorm_before\.", r"vision_model.encoder.layers.\1.norm1.", None),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.layernorm_after\.", r"vision_model.encoder.layers.\1.norm2.", None),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.lambda_1$", r"vision_model.encoder.layers.\1.ls1", None),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.lambda_2$", r"vision_model.encoder.layers.\1.ls2", None),
    (r"^vision_tower\.encoder\.layer\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp.", None),
    (r"^vision_tower\.layernorm\.", "vision_model.layernorm.", None),
    (r"^multi_modal_projector\.layer_norm\.", "mlp1.0.", None),
    (r"^multi_modal_projector\.linear_1\.", "mlp1.1.", None),
    (r"^multi_modal_projector\.linear_2\.", "mlp1.3.", None),
)
_LAYER_INDEX = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")
_HF_NATIVE_PATTERNS = tuple((re.compile(p), r, s) for p, r, s in HF_NATIVE_RENAMES)


def hf_native_name(name: str) -> tuple[str, int | None]:
    """transformers' name (without `model.`) -> (our name, qkv shard or None); unknown names pass."""
    for pattern, replacement, shard in _HF_NATIVE_PATTERNS:
        if pattern.search(name):
            return pattern.sub(replacement, name), shard
    return name, None


class InternVisionTower(nn.Module):
    """pixel_values [num_tiles, C, S, S] + grid_thw [num_items, 3] (t = tiles of the item)
    -> [num_tiles * tokens_per_tile, llm_hidden], items and tiles in order."""

    def __init__(self, config: InternViTConfig):
        super().__init__()
        self.config = config
        self.vision_model = InternVisionModel(config)
        self.mlp1 = projector(config)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(pixel_values, grid_thw)
        features = self.vision_model(pixel_values)[:, 1:]  # [n, (S/P)^2, D], class token dropped
        num_tiles, num_patches, dim = features.shape
        side = math.isqrt(num_patches)
        features = pixel_shuffle(features.reshape(num_tiles, side, side, dim), self.config.downsample_ratio,
                                 self.config.ps_version)
        features = features.reshape(num_tiles, -1, features.shape[-1])  # [n, tokens_per_tile, D/r^2]
        return self.mlp1(features).reshape(-1, self.config.llm_hidden_size)

    def _is_unused_layer(self, name: str) -> bool:
        if name.startswith("vision_model.layernorm.") and self.vision_model.layernorm is None:
            return self.config.final_norm  # exists, but not applied to an earlier layer's output
        match = _LAYER_INDEX.match(name)
        return match is not None and self.config.num_layers_run <= int(match.group(1)) < self.config.num_layers

    def _check_inputs(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None) -> None:
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (self.config.num_channels, size, size):
            raise ValueError(f"pixel_values must be [num_tiles, {self.config.num_channels}, {size}, {size}], "
                             f"got {tuple(pixel_values.shape)}")
        if grid_thw is not None and int(grid_thw[:, 0].sum()) != pixel_values.shape[0]:
            raise ValueError(f"grid_thw counts {int(grid_thw[:, 0].sum())} tiles, pixel_values has "
                             f"{pixel_values.shape[0]}")

    def expected_weight_names(self) -> set[str]:
        return {name for name, _ in self.named_parameters()}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], hf_native: bool = False,
                     merge_shards: bool = True) -> set[str]:
        """(name, tensor) in the original names (`vision_model.*`, `mlp1.*`), or transformers'
        names without `model.` when hf_native. Returns our names loaded; with merge_shards=False
        the q/k/v shards stay `name#0..2` (for callers that load in pieces: `merge_shard_keys`)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for ckpt_name, tensor in weights:
            name, shard = hf_native_name(ckpt_name) if hf_native else (ckpt_name, None)
            if self._is_unused_layer(name):
                continue  # layers after select_layer are never run (vLLM skips them too)
            param = params.get(name)
            if param is None:
                raise ValueError(f"unexpected InternVL vision weight {ckpt_name!r}")
            with torch.no_grad():
                if hasattr(param, "weight_loader"):
                    param.weight_loader(param, tensor, shard)
                elif tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(f"{ckpt_name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
                else:
                    param.copy_(tensor)
            loaded.add(name if shard is None else f"{name}#{shard}")
        return merge_shard_keys(loaded) if merge_shards else loaded


def merge_shard_keys(loaded: set[str]) -> set[str]:
    """name#0, name#1, name#2 all present -> name (a fused qkv parameter filled completely)."""
    merged = {key for key in loaded if "#" not in key}
    shards: dict[str, set[str]] = {}
    for key in loaded - merged:
        name, shard = key.split("#")
        shards.setdefault(name, set()).add(shard)
    for name, got in shards.items():
        merged.add(name if got == {"0", "1", "2"} else f"{name}#partial")
    return merged
