"""Rotary position embedding (neox / rotate_half layout) applied to query and key, with 1-D
positions or Qwen2-VL M-RoPE (three position rows: temporal, height, width).

Caller: `kernels.apply_rotary` (dispatch in `kernels/__init__.py`), from the engine's attention
blocks before `store_kv`.

cos_sin_cache: [max_position, head_dim]; row p holds cos(p * inv_freq) in [:D/2] and
sin(p * inv_freq) in [D/2:] for the D/2 frequencies. HF expands both to D as cat(f, f), so for
x = [x1 | x2]: out = [x1*cos - x2*sin | x2*cos + x1*sin].
With mrope_section [s0, s1, s2] (sum D/2), frequency j reads position row 0 for j < s0, row 1 for
j < s0 + s1, else row 2 (HF's split(mrope_section * 2) with chunk i taking row i % 3).
Math is float32; results are cast back to the input dtype. Returns new tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.jit import LazyKernel


def _cos_sin_per_token(positions, cos_sin_cache, mrope_section):
    half = cos_sin_cache.shape[1] // 2
    if mrope_section is None:
        rows = cos_sin_cache[positions].float()                    # [num_tokens, head_dim]
    else:
        if sum(mrope_section) != half:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = {half}")
        # Frequency j takes its angle from position row section_of[j].
        section_of = torch.repeat_interleave(
            torch.arange(len(mrope_section), device=positions.device),
            torch.tensor(mrope_section, device=positions.device))  # [half]
        per_row = cos_sin_cache[positions].float()                 # [3, num_tokens, head_dim]
        freq = torch.arange(half, device=positions.device)
        cos = per_row[section_of, :, freq].T                       # [num_tokens, half]
        sin = per_row[section_of, :, freq + half].T
        rows = torch.cat([cos, sin], dim=-1)
    return rows[:, :half], rows[:, half:]                          # [num_tokens, half] each


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = cos.shape[-1]
    x32 = x.float()                                                # [num_tokens, heads, head_dim]
    x1, x2 = x32[..., :half], x32[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def _reference(query, key, positions, cos_sin_cache, mrope_section):
    cos, sin = _cos_sin_per_token(positions, cos_sin_cache, mrope_section)
    return _rotate(query, cos, sin), _rotate(key, cos, sin)
