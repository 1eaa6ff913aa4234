"""Triton store_kv (interpreter) against the torch reference. Run by tests/kernels/test_store_kv.py."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import vlserve_kernels as kernels

assert os.environ.get("TRITON_INTERPRET") == "1", "run via tests/kernels/test_store_kv.py"
store_kv_module = importlib.import_module("vlserve_kernels.store_kv")


@pytest.mark.parametrize("block_size,num_kv_heads,head_dim,dtype", [
    (1, 2, 16, torch.float32), (8, 3, 24, torch.float16), (16, 2, 32, torch.bfloat16)])
def test_matches_reference(block_size, num_kv_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(block_size)
    # Same dtype as the cache: the interpreter's float32 -> bfloat16 cast truncates instead of rounding.
    key = torch.randn(7, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(7, num_kv_heads, head_dim, generator=gen).to(dtype)
    cache_shape = (6, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(cache_shape, generator=gen).to(dtype), torch.randn(cache_shape, generator=gen).to(dtype)
    slot_mapping = torch.tensor([0, -1, 6 * block_size - 1, 2 * block_size, -1, block_size + block_size // 2, 1 % block_size + 3 * block_size])
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    store_kv_module._reference(key, value, k_expected, v_expected, slot_mapping)
    kernels.store_kv(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
