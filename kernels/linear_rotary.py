"""Batch-invariant QKV projection, then the rotary and the K/V-cache write that follow it (an
attention layer's qkv_proj, then kernels.rotary_store_kv): qkv = x @ W^T (+ b); q, k, v = its
[Hq, Hkv, Hkv] head columns; -> rotated q [T, Hq, D], with rotated k and v written into the paged
cache at slot_mapping (-1 skipped).

Caller: `kernels.batch_invariant_qkv_rotary_store_kv` (dispatch in `kernels/__init__.py`), from
engine.layers.attention.Attention.of_projection in deterministic mode.

Where a small-M product sums its K ranges in a second launch (the GPU's table says "two_launch",
kernels/matmul.py), that launch also rotates and writes the cache: one launch instead of two per
layer. Same bits as the product then kernels/rotary.py's fused rotary + store_kv: the K-range sum is
_sum_partials_kernel's (ranges in order, then the bias, one rounding to x's dtype), the rotation is
rotary's own code (store_rotated) on those rounded values, and v is the rounded sum cast to the
cache's dtype, as store_kv casts it. Every other case runs the two kernels.

    partial [S, M, (Hq + 2 Hkv) * D] fp32 --(one program per token)--> query_out [M, Hq, D]
                                                                   \\-> k_cache, v_cache slots
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import kernels.dependent_launch as dependent_launch
import kernels.matmul as matmul
import kernels.rotary as rotary
from kernels.dependent_launch import wait_previous_kernel
from kernels.rotary import store_rotated, token_cos_sin


def split_heads(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int):
    """qkv [T, (Hq + 2 Hkv) * D] -> views query [T, Hq, D], key and value [T, Hkv, D]."""
    num_tokens = qkv.shape[0]
    head_dim = qkv.shape[1] // (num_q_heads + 2 * num_kv_heads)
    if head_dim * (num_q_heads + 2 * num_kv_heads) != qkv.shape[1]:
        raise ValueError(f"qkv width {qkv.shape[1]} is not (Hq {num_q_heads} + 2 Hkv {num_kv_heads}) x head_dim")
    query, key, value = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    return (query.view(num_tokens, num_q_heads, head_dim), key.view(num_tokens, num_kv_heads, head_dim),
            value.view(num_tokens, num_kv_heads, head_dim))


def _reference(x, weight, bias, num_q_heads, num_kv_heads, positions, cos_sin_cache, k_cache, v_cache,
               slot_mapping, mrope_section, interleaved):
    query, key, value = split_heads(matmul._reference(x, weight, bias), num_q_heads, num_kv_heads)
    return rotary._rotary_store_kv_reference(query, key, value, positions, cos_sin_cache, k_cache, v_cache,
                                             slot_mapping, mrope_section, interleaved)


@triton.jit
def _column_sums(partial_row, bias_ptr, cols, mask, row_stride, NUM_SPLITS, HAS_BIAS: tl.constexpr):
    # ((0 + partial[0, m, cols]) + partial[1, m, cols]) + ... (+ bias[cols]): _sum_partials_kernel's
    # additions, fp32. partial_row points at range 0's row m; row_stride = M * N (one range apart).
    total = tl.zeros(cols.shape, dtype=tl.float32)
    for split in range(0, NUM_SPLITS):
        total += tl.load(partial_row + split * row_stride + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return total


@triton.jit
def _head_halves(partial_row, bias_ptr, first_col, num_heads, half, row_stride, NUM_SPLITS, dtype,
                 HAS_BIAS: tl.constexpr, HEADS_PADDED: tl.constexpr, HALF_PADDED: tl.constexpr):
    # Heads [0, num_heads) of the qkv columns starting at first_col: their first and second halves
    # [HEADS_PADDED, HALF_PADDED] as the product stores them (rounded to dtype), and the mask.
    heads = tl.arange(0, HEADS_PADDED)[:, None]
    freqs = tl.arange(0, HALF_PADDED)[None, :]
    mask = (heads < num_heads) & (freqs < half)
    cols = first_col + heads * (2 * half) + freqs
    x1 = _column_sums(partial_row, bias_ptr, cols, mask, row_stride, NUM_SPLITS, HAS_BIAS).to(dtype)
    x2 = _column_sums(partial_row, bias_ptr, cols + half, mask, row_stride, NUM_SPLITS, HAS_BIAS).to(dtype)
    return x1, x2, mask


@triton.jit(do_not_specialize=["M", "NUM_SPLITS"])
def _sum_rotary_store_kernel(
    partial_ptr, bias_ptr, query_out_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, positions_ptr, cos_sin_ptr,
    M, N, num_q_heads, num_kv_heads, half, section_0, section_1, section_2, stride_qo_t, stride_qo_h,
    stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h, stride_pos_row, stride_cache,
    NUM_SPLITS, HAS_BIAS: tl.constexpr, BLOCK_SIZE: tl.constexpr, IS_MROPE: tl.constexpr,
    IS_INTERLEAVED: tl.constexpr, Q_HEADS_PADDED: tl.constexpr, K_HEADS_PADDED: tl.constexpr,
    HALF_PADDED: tl.constexpr, PDL: tl.constexpr,
):
    # One program per token: q -> query_out always; rotated k and v -> its cache slot unless slot < 0.
    wait_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    dtype = query_out_ptr.dtype.element_ty      # the product's dtype (x's)
    cos, sin = token_cos_sin(positions_ptr, cos_sin_ptr, token, half, section_0, section_1, section_2,
                             stride_pos_row, stride_cache, IS_MROPE, IS_INTERLEAVED, HALF_PADDED)
    partial_row = partial_ptr + token * N
    row_stride = M * N
    q1, q2, q_mask = _head_halves(partial_row, bias_ptr, 0, num_q_heads, half, row_stride, NUM_SPLITS, dtype,
                                  HAS_BIAS, Q_HEADS_PADDED, HALF_PADDED)
    q_heads = tl.arange(0, Q_HEADS_PADDED)[:, None]
    freqs = tl.arange(0, HALF_PADDED)[None, :]
    store_rotated(q1, q2, query_out_ptr + token * stride_qo_t + q_heads * stride_qo_h + freqs, half, q_mask,
                  cos, sin)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        block_id, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        kv_heads = tl.arange(0, K_HEADS_PADDED)[:, None]
        k_first, v_first = num_q_heads * 2 * half, (num_q_heads + num_kv_heads) * 2 * half
        k1, k2, kv_mask = _head_halves(partial_row, bias_ptr, k_first, num_kv_heads, half, row_stride, NUM_SPLITS,
                                       dtype, HAS_BIAS, K_HEADS_PADDED, HALF_PADDED)
        k_dst = k_cache_ptr + block_id * stride_kc_b + offset * stride_kc_s + kv_heads * stride_kc_h + freqs
        store_rotated(k1, k2, k_dst, half, kv_mask, cos, sin)
        v1, v2, _ = _head_halves(partial_row, bias_ptr, v_first, num_kv_heads, half, row_stride, NUM_SPLITS,
                                 dtype, HAS_BIAS, K_HEADS_PADDED, HALF_PADDED)
        v_dst = v_cache_ptr + block_id * stride_vc_b + offset * stride_vc_s + kv_heads * stride_vc_h + freqs
        tl.store(v_dst, v1.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(v_dst + half, v2.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)


def launch(x, weight, bias, num_q_heads, num_kv_heads, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
           mrope_section, interleaved, tile, num_splits, split_len, swap_ab=False) -> torch.Tensor:
    """The fused path with an explicit tile and K split (kernels/matmul.launch's arguments)."""
    product, partial = matmul.launch_unsummed(x, weight, bias, tile, num_splits, split_len, swap_ab=swap_ab)
    query, key, value = split_heads(product, num_q_heads, num_kv_heads)
    if partial is None:
        return rotary._rotary_store_kv_triton(query, key, value, positions, cos_sin_cache, k_cache, v_cache,
                                              slot_mapping, mrope_section, interleaved)
    sections = rotary._sections(query, key, positions, cos_sin_cache, mrope_section)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must be contiguous in head_dim")
    num_rows, head_dim = product.shape[0], query.shape[-1]
    query_out = product.new_empty((num_rows, num_q_heads, head_dim))
    _sum_rotary_store_kernel[(num_rows,)](
        partial, bias if bias is not None else weight, query_out, k_cache, v_cache, slot_mapping, positions,
        cos_sin_cache, num_rows, product.shape[1], num_q_heads, num_kv_heads, head_dim // 2, *sections,
        query_out.stride(0), query_out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        positions.stride(0) if positions.dim() == 2 else 0, cos_sin_cache.stride(0), num_splits,
        HAS_BIAS=bias is not None, BLOCK_SIZE=k_cache.shape[1], IS_MROPE=mrope_section is not None,
        IS_INTERLEAVED=interleaved, Q_HEADS_PADDED=triton.next_power_of_2(num_q_heads),
        K_HEADS_PADDED=triton.next_power_of_2(num_kv_heads), HALF_PADDED=triton.next_power_of_2(head_dim // 2),
        PDL=(pdl := dependent_launch.enabled(x)), launch_pdl=pdl)
    return query_out


def _triton(x, weight, bias, num_q_heads, num_kv_heads, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
            mrope_section, interleaved):
    entry = matmul.second_launch_entry(x, weight)
    if entry is None:
        query, key, value = split_heads(matmul._triton(x, weight, bias), num_q_heads, num_kv_heads)
        return rotary._rotary_store_kv_triton(query, key, value, positions, cos_sin_cache, k_cache, v_cache,
                                              slot_mapping, mrope_section, interleaved)
    tile, num_splits, split_len = matmul.plan(x.shape[0], weight.shape[0], x.shape[1], True)
    return launch(x, weight, bias, num_q_heads, num_kv_heads, positions, cos_sin_cache, k_cache, v_cache,
                  slot_mapping, mrope_section, interleaved, tile, num_splits, split_len,
                  swap_ab=bool(entry.get("swap_ab")))
