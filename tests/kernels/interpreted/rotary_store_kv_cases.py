"""Fused kernels.rotary_store_kv (interpreter) against its oracle, the unfused Triton kernels
apply_rotary + store_kv in the same interpreter: the rotated query and both caches must be
bit-identical. Run by tests/kernels/test_rotary_store_kv.py."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import vlserve_kernels as kernels

assert os.environ.get("TRITON_INTERPRET") == "1", "run via tests/kernels/test_rotary_store_kv.py"
rotary_module = importlib.import_module("vlserve_kernels.rotary")

NUM_TOKENS, BLOCK_SIZE, NUM_BLOCKS, MAX_POSITION = 6, 4, 5, 40
# Token 1 and 4 are padding (-1); the others land in scattered blocks and offsets.
SLOTS = [17, -1, 0, 2 * BLOCK_SIZE + 3, -1, NUM_BLOCKS * BLOCK_SIZE - 1]


def _inputs(num_q_heads, num_kv_heads, head_dim, mrope_section, dtype):
    gen = torch.Generator().manual_seed(head_dim + num_q_heads)
    # q, k, v as column slices of one qkv row (the layers' layout): strided, contiguous in head_dim.
    widths = [num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = torch.randn(NUM_TOKENS, sum(widths), generator=gen).to(dtype)
    query, key, value = (t.view(NUM_TOKENS, -1, head_dim) for t in qkv.split(widths, dim=-1))
    cos_sin_cache = torch.randn(MAX_POSITION, head_dim, generator=gen).to(dtype)
    shape = (3, NUM_TOKENS) if mrope_section else (NUM_TOKENS,)
    positions = torch.randint(0, MAX_POSITION, shape, generator=gen)
    cache_shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    caches = torch.randn(cache_shape, generator=gen).to(dtype), torch.randn(cache_shape, generator=gen).to(dtype)
    return query, key, value, positions, cos_sin_cache, caches


CASES = [  # num_q_heads, num_kv_heads, head_dim, mrope_section, dtype, interleaved
    (4, 2, 64, None, torch.float32, False), (4, 2, 64, None, torch.bfloat16, False),
    (16, 2, 128, None, torch.bfloat16, False), (7, 1, 24, None, torch.float16, False),
    (16, 2, 128, [16, 24, 24], torch.bfloat16, False), (4, 4, 64, [8, 12, 12], torch.float32, False),
    (8, 2, 128, [24, 20, 20], torch.bfloat16, True), (4, 2, 64, [10, 11, 11], torch.float32, True),
]


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,mrope_section,dtype,interleaved", CASES)
def test_bit_identical_to_apply_rotary_then_store_kv(num_q_heads, num_kv_heads, head_dim, mrope_section,
                                                     dtype, interleaved):
    query, key, value, positions, cos_sin_cache, (k_cache, v_cache) = _inputs(
        num_q_heads, num_kv_heads, head_dim, mrope_section, dtype)
    slot_mapping = torch.tensor(SLOTS)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    q_expected, k_rotated = kernels.apply_rotary(query, key, positions, cos_sin_cache, mrope_section, interleaved)
    kernels.store_kv(k_rotated, value, k_expected, v_expected, slot_mapping)
    q_out = kernels.rotary_store_kv(query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                    mrope_section, interleaved)
    assert torch.equal(q_out, q_expected)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
    assert not torch.equal(k_cache, v_cache)  # rotated k went to k_cache, v to v_cache


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,mrope_section,dtype,interleaved", CASES[:1] + CASES[5:6])
def test_close_to_the_torch_reference(num_q_heads, num_kv_heads, head_dim, mrope_section, dtype, interleaved):
    """float32 only: the interpreter's casts to half types truncate where torch rounds."""
    query, key, value, positions, cos_sin_cache, (k_cache, v_cache) = _inputs(
        num_q_heads, num_kv_heads, head_dim, mrope_section, dtype)
    slot_mapping = torch.tensor(SLOTS)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    q_expected = rotary_module._rotary_store_kv_reference(query, key, value, positions, cos_sin_cache,
                                                          k_expected, v_expected, slot_mapping, mrope_section,
                                                          interleaved)
    q_out = kernels.rotary_store_kv(query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                    mrope_section, interleaved)
    torch.testing.assert_close(q_out, q_expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_cache, k_expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache, v_expected)


def test_kv_cache_of_another_dtype_rounds_through_key_dtype():
    """bfloat16 q/k/v, float32 cache: the cache holds apply_rotary's bfloat16 k (widened), not the
    kernel's float32 arithmetic."""
    query, key, value, positions, cos_sin_cache, (k_cache, v_cache) = _inputs(4, 2, 64, None, torch.bfloat16)
    k_cache, v_cache = k_cache.float(), v_cache.float()
    slot_mapping = torch.tensor(SLOTS)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    q_expected, k_rotated = kernels.apply_rotary(query, key, positions, cos_sin_cache)
    kernels.store_kv(k_rotated, value, k_expected, v_expected, slot_mapping)
    q_out = kernels.rotary_store_kv(query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    assert torch.equal(q_out, q_expected)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


def test_no_tokens_launches_nothing():
    query, key, value, positions, cos_sin_cache, (k_cache, v_cache) = _inputs(4, 2, 64, None, torch.float32)
    before = k_cache.clone()
    q_out = kernels.rotary_store_kv(query[:0], key[:0], value[:0], positions[:0], cos_sin_cache, k_cache, v_cache,
                                    torch.tensor(SLOTS)[:0])
    assert q_out.shape == (0, 4, 64) and torch.equal(k_cache, before)
