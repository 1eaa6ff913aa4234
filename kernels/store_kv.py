"""Scatter new K/V rows into the paged KV cache by flat slot (slot = block_id * block_size + offset).

Caller: `kernels.store_kv` (dispatch in `kernels/__init__.py`), once per attention layer per step,
before `paged_attention` reads the cache. Slot -1 marks a padded token and is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import vlserve_kernels.dependent_launch as dependent_launch
from vlserve_kernels.dependent_launch import wait_previous_kernel


def _reference(
    key: torch.Tensor,           # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,         # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,       # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,       # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    block_size = k_cache.shape[1]
    slot_mapping = slot_mapping[: key.shape[0]]
    is_valid = slot_mapping >= 0                             # [num_tokens]
    slots = slot_mapping[is_valid].long()                    # [num_valid]
    block_ids, offsets = slots // block_size, slots % block_size
    # Advanced indexing on (block, offset) writes through any cache strides (no flatten copy).
    k_cache[block_ids, offsets] = key[is_valid].to(k_cache.dtype)
    v_cache[block_ids, offsets] = value[is_valid].to(v_cache.dtype)


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_key_t, stride_key_h, stride_value_t, stride_value_h,
    stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
    num_kv_heads, head_dim,
    BLOCK_SIZE: tl.constexpr, HEADS_PADDED: tl.constexpr, DIM_PADDED: tl.constexpr, PDL: tl.constexpr,
):
    wait_previous_kernel(PDL)
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block_id = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PADDED)[:, None]
    dims = tl.arange(0, DIM_PADDED)[None, :]
    mask = (heads < num_kv_heads) & (dims < head_dim)
    token64 = token.to(tl.int64)
    k = tl.load(key_ptr + token64 * stride_key_t + heads * stride_key_h + dims, mask=mask)
    v = tl.load(value_ptr + token64 * stride_value_t + heads * stride_value_h + dims, mask=mask)
    k_dst = k_cache_ptr + block_id * stride_kc_b + offset * stride_kc_s + heads * stride_kc_h + dims
    v_dst = v_cache_ptr + block_id * stride_vc_b + offset * stride_vc_s + heads * stride_vc_h + dims
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _triton(key, value, k_cache, v_cache, slot_mapping) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    for name, t in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_kv_heads, head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        HEADS_PADDED=triton.next_power_of_2(num_kv_heads),
        DIM_PADDED=triton.next_power_of_2(head_dim),
        PDL=(pdl := dependent_launch.enabled(key)), launch_pdl=pdl,
    )
