"""Rotary position embedding (neox / rotate_half layout) applied to query and key, with 1-D
positions or Qwen2-VL M-RoPE (three position rows: temporal, height, width).

Callers (dispatch in `kernels/__init__.py`): `kernels.apply_rotary` (the vision towers, tests) and
`kernels.rotary_store_kv`, the engine's attention layers: the same rotation fused with store_kv
(kernels/store_kv.py), rotated k and v written straight into the paged cache, one launch per layer.

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

import vlserve_kernels.dependent_launch as dependent_launch
from vlserve_kernels.dependent_launch import wait_previous_kernel

from vlserve_kernels.store_kv import _reference as _store_kv_reference


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
    # Round to x's dtype first (apply_rotary's output), then to out's (a KV cache of another dtype):
    # the fused rotary + store_kv then writes what apply_rotary + store_kv would.
    out = out_ptr + token * stride_ot + heads * stride_oh + freqs
    tl.store(out, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + half, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _token_cos_sin(positions_ptr, cos_sin_ptr, token, half, section_0, section_1, section_2,
                   stride_pos_row, stride_cache,
                   IS_MROPE: tl.constexpr, IS_INTERLEAVED: tl.constexpr, HALF_PADDED: tl.constexpr):
    # -> cos, sin [1, HALF_PADDED] float32 of `token`; frequency j takes its position from row
    # 0/1/2 by M-RoPE section (module docstring).
    freqs = tl.arange(0, HALF_PADDED)
    freq_valid = freqs < half
    if IS_MROPE:
        if IS_INTERLEAVED:  # j % 3 == 1 (j < 3*s1) -> h, j % 3 == 2 (j < 3*s2) -> w, else t
            residue = freqs % 3
            section = (((residue == 1) & (freqs < 3 * section_1)).to(tl.int64)
                       + 2 * ((residue == 2) & (freqs < 3 * section_2)).to(tl.int64))
        else:
            section = (freqs >= section_0).to(tl.int64) + (freqs >= section_0 + section_1).to(tl.int64)
        position = tl.load(positions_ptr + section * stride_pos_row + token, cache_modifier=".cg")  # [HALF_PADDED]
    else:
        position = tl.load(positions_ptr + token + freqs * 0, cache_modifier=".cg")
    row = cos_sin_ptr + position.to(tl.int64) * stride_cache + freqs
    cos = tl.load(row, mask=freq_valid, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(row + half, mask=freq_valid, other=0.0).to(tl.float32)[None, :]
    return cos, sin


# stride_pos_row is the step's token count for M-RoPE positions [3, T]: not specialised (== 1, divisible
# by 16), or a new count would compile another kernel in the middle of serving.
@triton.jit(do_not_specialize=["stride_pos_row"])
def _rotary_kernel(
    query_ptr, key_ptr, query_out_ptr, key_out_ptr, positions_ptr, cos_sin_ptr,
    num_q_heads, num_kv_heads, half, section_0, section_1, section_2,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_qo_t, stride_qo_h, stride_ko_t, stride_ko_h,
    stride_pos_row, stride_cache,
    IS_MROPE: tl.constexpr, IS_INTERLEAVED: tl.constexpr, Q_HEADS_PADDED: tl.constexpr, K_HEADS_PADDED: tl.constexpr,
    HALF_PADDED: tl.constexpr, PDL: tl.constexpr,
):
    # One program per token. The wait comes first: the vision towers compute positions and the table
    # (cos_sin_ptr) in the launches just before this one.
    wait_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _token_cos_sin(positions_ptr, cos_sin_ptr, token, half, section_0, section_1, section_2,
                              stride_pos_row, stride_cache, IS_MROPE, IS_INTERLEAVED, HALF_PADDED)
    _rotate_heads(query_ptr, query_out_ptr, token, num_q_heads, half, stride_q_t, stride_q_h,
                  stride_qo_t, stride_qo_h, cos, sin, Q_HEADS_PADDED, HALF_PADDED)
    _rotate_heads(key_ptr, key_out_ptr, token, num_kv_heads, half, stride_k_t, stride_k_h,
                  stride_ko_t, stride_ko_h, cos, sin, K_HEADS_PADDED, HALF_PADDED)


def _sections(query, key, positions, cos_sin_cache, mrope_section) -> list[int]:
    """Checks the launch inputs; -> the three section sizes the kernels take ([half, 0, 0] for 1-D)."""
    half = query.shape[-1] // 2
    if mrope_section is not None and sum(mrope_section) != half:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = {half}")
    if any(t.stride(-1) != 1 for t in (query, key, cos_sin_cache)) or positions.stride(-1) != 1:
        raise ValueError("query, key, positions and cos_sin_cache must be contiguous in the last dimension")
    return list(mrope_section) if mrope_section is not None else [half, 0, 0]


def _triton(query, key, positions, cos_sin_cache, mrope_section, interleaved: bool = False):
    num_tokens, num_q_heads, head_dim = query.shape
    sections = _sections(query, key, positions, cos_sin_cache, mrope_section)
    query_out, key_out = torch.empty_like(query), torch.empty_like(key)
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            query, key, query_out, key_out, positions, cos_sin_cache,
            num_q_heads, key.shape[1], head_dim // 2, sections[0], sections[1], sections[2],
            query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            query_out.stride(0), query_out.stride(1), key_out.stride(0), key_out.stride(1),
            positions.stride(0) if positions.dim() == 2 else 0, cos_sin_cache.stride(0),
            IS_MROPE=mrope_section is not None, IS_INTERLEAVED=interleaved,
            Q_HEADS_PADDED=triton.next_power_of_2(num_q_heads),
            K_HEADS_PADDED=triton.next_power_of_2(key.shape[1]),
            HALF_PADDED=triton.next_power_of_2(head_dim // 2),
            PDL=(pdl := dependent_launch.enabled(query)), launch_pdl=pdl)
    return query_out, key_out


# ---- Fused rotary + store_kv: the same rotation, with k going straight into the paged cache. ----

def _rotary_store_kv_reference(query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                               mrope_section, interleaved: bool = False) -> torch.Tensor:
    """apply_rotary's reference, then store_kv's: the CPU backend and the fused kernel's oracle."""
    query_out, key_out = _reference(query, key, positions, cos_sin_cache, mrope_section, interleaved)
    _store_kv_reference(key_out, value, k_cache, v_cache, slot_mapping)
    return query_out


@triton.jit
def _copy_heads(x_ptr, out_ptr, num_heads, head_dim, stride_h, stride_oh,
                HEADS_PADDED: tl.constexpr, DIM_PADDED: tl.constexpr):
    # x_ptr / out_ptr point at one token's [num_heads, head_dim] rows (store_kv's value copy).
    heads = tl.arange(0, HEADS_PADDED)[:, None]
    dims = tl.arange(0, DIM_PADDED)[None, :]
    mask = (heads < num_heads) & (dims < head_dim)
    x = tl.load(x_ptr + heads * stride_h + dims, mask=mask)
    tl.store(out_ptr + heads * stride_oh + dims, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["stride_pos_row"])   # as _rotary_kernel
def _rotary_store_kv_kernel(
    query_ptr, key_ptr, value_ptr, query_out_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    positions_ptr, cos_sin_ptr, num_q_heads, num_kv_heads, half, section_0, section_1, section_2,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_qo_t, stride_qo_h,
    stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h, stride_pos_row, stride_cache,
    BLOCK_SIZE: tl.constexpr, IS_MROPE: tl.constexpr, IS_INTERLEAVED: tl.constexpr,
    Q_HEADS_PADDED: tl.constexpr, K_HEADS_PADDED: tl.constexpr, HALF_PADDED: tl.constexpr, PDL: tl.constexpr,
):
    # One program per token: q -> query_out always; rotated k and v -> cache slot unless slot < 0.
    # Positions, slot mapping (both written before the step's first kernel) and the cos/sin cache are
    # read before the wait (dependent_launch's rule): only q, k and v wait for the previous kernel.
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _token_cos_sin(positions_ptr, cos_sin_ptr, token, half, section_0, section_1, section_2,
                              stride_pos_row, stride_cache, IS_MROPE, IS_INTERLEAVED, HALF_PADDED)
    slot = tl.load(slot_mapping_ptr + token, cache_modifier=".cg").to(tl.int64)
    wait_previous_kernel(PDL)
    _rotate_heads(query_ptr, query_out_ptr, token, num_q_heads, half, stride_q_t, stride_q_h,
                  stride_qo_t, stride_qo_h, cos, sin, Q_HEADS_PADDED, HALF_PADDED)
    if slot >= 0:
        block_id, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        k_dst = k_cache_ptr + block_id * stride_kc_b + offset * stride_kc_s   # this slot's [Hkv, D]
        v_dst = v_cache_ptr + block_id * stride_vc_b + offset * stride_vc_s
        # stride_ot 0: the destination is already this token's slot.
        _rotate_heads(key_ptr, k_dst, token, num_kv_heads, half, stride_k_t, stride_k_h,
                      0, stride_kc_h, cos, sin, K_HEADS_PADDED, HALF_PADDED)
        _copy_heads(value_ptr + token * stride_v_t, v_dst, num_kv_heads, 2 * half, stride_v_h, stride_vc_h,
                    K_HEADS_PADDED, 2 * HALF_PADDED)


def store_kv_sections(query, key, value, positions, cos_sin_cache, k_cache, v_cache, mrope_section) -> list[int]:
    """_sections, plus the checks of the K/V write (also paged attention's fused decode launch)."""
    if any(t.stride(-1) != 1 for t in (value, k_cache, v_cache)):
        raise ValueError("value, k_cache and v_cache must be contiguous in head_dim")
    return _sections(query, key, positions, cos_sin_cache, mrope_section)


def _rotary_store_kv_triton(query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                            mrope_section, interleaved: bool = False) -> torch.Tensor:
    num_tokens, num_q_heads, head_dim = query.shape
    sections = store_kv_sections(query, key, value, positions, cos_sin_cache, k_cache, v_cache, mrope_section)
    query_out = torch.empty_like(query)
    if num_tokens:
        _rotary_store_kv_kernel[(num_tokens,)](
            query, key, value, query_out, k_cache, v_cache, slot_mapping, positions, cos_sin_cache,
            num_q_heads, key.shape[1], head_dim // 2, sections[0], sections[1], sections[2],
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            query_out.stride(0), query_out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            positions.stride(0) if positions.dim() == 2 else 0, cos_sin_cache.stride(0),
            BLOCK_SIZE=k_cache.shape[1], IS_MROPE=mrope_section is not None, IS_INTERLEAVED=interleaved,
            Q_HEADS_PADDED=triton.next_power_of_2(num_q_heads),
            K_HEADS_PADDED=triton.next_power_of_2(key.shape[1]),
            HALF_PADDED=triton.next_power_of_2(head_dim // 2),
            PDL=(pdl := dependent_launch.enabled(query)), launch_pdl=pdl)
    return query_out
