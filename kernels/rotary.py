"""Rotary position embedding (neox / rotate_half layout) applied to query and key, with 1-D
positions or Qwen2-VL M-RoPE (three position rows: temporal, height, width).

Caller: `kernels.apply_rotary` (dispatch in `kernels/__init__.py`), from the engine's attention
blocks before `store_kv`.

cos_sin_cache: [max_position, head_dim]; row p holds cos(p * inv_freq) in [:D/2] and
sin(p * inv_freq) in [D/2:] for the D/2 frequencies. HF expands both to D as cat(f, f), so for
x = [x1 | x2]: out = [x1*cos - x2*sin | x2*cos + x1*sin].
With mrope_section [s0, s1, s2] (sum D/2), frequency j reads position row 0 for j < s0, row 1 for
j < s0 + s1, else row 2 (HF's split(mrope_section * 2) with chunk i taking row i % 3).
Interleaved M-RoPE (Qwen3-VL, `mrope_interleaved`): frequency j reads row 1 when j % 3 == 1 and
j < 3*s1, row 2 when j % 3 == 2 and j < 3*s2, else row 0 (HF's recomposition_frequencies):
    sections [2, 3, 3], D/2 = 8:   j    0 1 2 3 4 5 6 7
                                   row  0 1 2 0 1 2 0 1
Math is float32; results are cast back to the input dtype. Returns new tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _section_of(mrope_section, half: int, interleaved: bool, device) -> torch.Tensor:
    """[half] int64: the position row (0 t, 1 h, 2 w) frequency j reads (module docstring)."""
    if sum(mrope_section) != half:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = {half}")
    if not interleaved:
        return torch.repeat_interleave(torch.arange(len(mrope_section), device=device),
                                       torch.tensor(mrope_section, device=device))
    freq = torch.arange(half, device=device)
    rows = torch.zeros(half, dtype=torch.int64, device=device)
    rows[(freq % 3 == 1) & (freq < 3 * mrope_section[1])] = 1
    rows[(freq % 3 == 2) & (freq < 3 * mrope_section[2])] = 2
    return rows


def _cos_sin_per_token(positions, cos_sin_cache, mrope_section, interleaved: bool = False):
    half = cos_sin_cache.shape[1] // 2
    if mrope_section is None:
        rows = cos_sin_cache[positions].float()                    # [num_tokens, head_dim]
    else:
        # Frequency j takes its angle from position row section_of[j].
        section_of = _section_of(mrope_section, half, interleaved, positions.device)  # [half]
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


def _reference(query, key, positions, cos_sin_cache, mrope_section, interleaved: bool = False):
    cos, sin = _cos_sin_per_token(positions, cos_sin_cache, mrope_section, interleaved)
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, token, num_heads, half, stride_t, stride_h, stride_ot, stride_oh,
                  cos, sin, HEADS_PADDED: tl.constexpr, HALF_PADDED: tl.constexpr):
    heads = tl.arange(0, HEADS_PADDED)[:, None]
    freqs = tl.arange(0, HALF_PADDED)[None, :]
    mask = (heads < num_heads) & (freqs < half)
    first = x_ptr + token * stride_t + heads * stride_h + freqs
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)              # [HEADS_PADDED, HALF_PADDED]
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    out = out_ptr + token * stride_ot + heads * stride_oh + freqs
    tl.store(out, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + half, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    query_ptr, key_ptr, query_out_ptr, key_out_ptr, positions_ptr, cos_sin_ptr,
    num_q_heads, num_kv_heads, half, section_0, section_1, section_2,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_qo_t, stride_qo_h, stride_ko_t, stride_ko_h,
    stride_pos_row, stride_cache,
    IS_MROPE: tl.constexpr, IS_INTERLEAVED: tl.constexpr, Q_HEADS_PADDED: tl.constexpr, K_HEADS_PADDED: tl.constexpr,
    HALF_PADDED: tl.constexpr,
):
    # One program per token; frequency j takes its position from row 0/1/2 by M-RoPE section.
    token = tl.program_id(0).to(tl.int64)
    freqs = tl.arange(0, HALF_PADDED)
    freq_valid = freqs < half
    if IS_MROPE:
        if IS_INTERLEAVED:  # j % 3 == 1 (j < 3*s1) -> h, j % 3 == 2 (j < 3*s2) -> w, else t
            residue = freqs % 3
            section = (((residue == 1) & (freqs < 3 * section_1)).to(tl.int64)
                       + 2 * ((residue == 2) & (freqs < 3 * section_2)).to(tl.int64))
        else:
            section = (freqs >= section_0).to(tl.int64) + (freqs >= section_0 + section_1).to(tl.int64)
        position = tl.load(positions_ptr + section * stride_pos_row + token)      # [HALF_PADDED]
    else:
        position = tl.load(positions_ptr + token + freqs * 0)
    row = cos_sin_ptr + position.to(tl.int64) * stride_cache + freqs
    cos = tl.load(row, mask=freq_valid, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(row + half, mask=freq_valid, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(query_ptr, query_out_ptr, token, num_q_heads, half, stride_q_t, stride_q_h,
                  stride_qo_t, stride_qo_h, cos, sin, Q_HEADS_PADDED, HALF_PADDED)
    _rotate_heads(key_ptr, key_out_ptr, token, num_kv_heads, half, stride_k_t, stride_k_h,
                  stride_ko_t, stride_ko_h, cos, sin, K_HEADS_PADDED, HALF_PADDED)


def _triton(query, key, positions, cos_sin_cache, mrope_section, interleaved: bool = False):
    num_tokens, num_q_heads, head_dim = query.shape
    half = head_dim // 2
    if mrope_section is not None and sum(mrope_section) != half:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = {half}")
    if any(t.stride(-1) != 1 for t in (query, key, cos_sin_cache)) or positions.stride(-1) != 1:
        raise ValueError("query, key, positions and cos_sin_cache must be contiguous in the last dimension")
    query_out, key_out = torch.empty_like(query), torch.empty_like(key)
    sections = mrope_section if mrope_section is not None else [half, 0, 0]
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            query, key, query_out, key_out, positions, cos_sin_cache,
            num_q_heads, key.shape[1], half, sections[0], sections[1], sections[2],
            query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            query_out.stride(0), query_out.stride(1), key_out.stride(0), key_out.stride(1),
            positions.stride(0) if positions.dim() == 2 else 0, cos_sin_cache.stride(0),
            IS_MROPE=mrope_section is not None, IS_INTERLEAVED=interleaved,
            Q_HEADS_PADDED=triton.next_power_of_2(num_q_heads),
            K_HEADS_PADDED=triton.next_power_of_2(key.shape[1]),
            HALF_PADDED=triton.next_power_of_2(half))
    return query_out, key_out
