"""Rotary position embedding (neox / rotate-half layout, as HF Qwen2), with the M-RoPE variant
of Qwen2-VL: positions [3, T] (temporal, height, width) and `mrope_section` saying which
frequencies read which row (in blocks; interleaved t/h/w for Qwen3-VL, `mrope_interleaved`).
Caller: engine.layers.attention.AttentionBackend, which hands cos_sin_cache and `section` to
`kernels.rotary_store_kv_attention` (the rotary fused with the K/V-cache write, and at decode with the
attention too); `forward` (`kernels.apply_rotary`) rotates without caching.

cos_sin_cache [max_position, head_dim]: row p = cos(p * inv_freq) | sin(p * inv_freq), each half
head_dim/2 wide. Computed in float32 and cast to the model dtype, as HF casts cos/sin to x.dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import vlserve_kernels as kernels


def rope_parameters(text_config: Any) -> tuple[float, list[int] | None]:
    """(rope_theta, mrope_section or None) from a HF text config (transformers 4 or 5 layout)."""
    params = dict(getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(text_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    mrope_section = params.get("mrope_section")
    if rope_type not in ("default", "mrope") and mrope_section is None:
        raise ValueError(f"rope type {rope_type!r} is not supported (supported: default, mrope)")
    return float(theta), (list(mrope_section) if mrope_section is not None else None)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float,
                 mrope_section: list[int] | None = None, dtype: torch.dtype | None = None,
                 mrope_interleaved: bool = False):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        if mrope_section is not None and sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
        self.head_dim = head_dim
        self.mrope_section = mrope_section
        self.mrope_interleaved = mrope_interleaved
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
        freqs = torch.arange(max_position, dtype=torch.float32, device="cpu")[:, None] * inv_freq  # [P, D/2]
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [P, D]
        self.register_buffer("cos_sin_cache", cache.to(dtype or torch.get_default_dtype()), persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        """positions [T] or [3, T] int64; query [T, Hq, D]; key [T, Hkv, D] -> rotated (query, key)."""
        return kernels.apply_rotary(query, key, positions, self.cos_sin_cache, self.section(positions),
                                    self.mrope_interleaved)

    def section(self, positions: torch.Tensor) -> list[int] | None:
        """The mrope_section that positions [T] or [3, T] call for (the kernels' argument)."""
        # 1-D positions on an M-RoPE model stand for three equal rows: plain RoPE is the same rotation.
        return self.mrope_section if positions.dim() == 2 else None
