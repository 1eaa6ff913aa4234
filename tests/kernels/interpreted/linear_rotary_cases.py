"""kernels/linear_rotary.py (interpreter): the fused K-range sum + rotary + K/V-cache write gives the
bits of the product (two-launch sum) followed by kernels/rotary.py's fused rotary + store_kv: the
rotated query and both caches, with and without bias, one and several K ranges, plain and swapped
tiles, 1-D and M-RoPE positions, padding slots. Run by tests/kernels/test_linear_rotary.py.
float32 and float16: the interpreter has no bfloat16 arithmetic."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import kernels
from kernels import matmul

assert os.environ.get("TRITON_INTERPRET") == "1", "run via tests/kernels/test_linear_rotary.py"
linear_rotary = importlib.import_module("kernels.linear_rotary")

BLOCK_SIZE, NUM_BLOCKS, MAX_POSITION = 4, 20, 50   # 80 slots: every case's tokens fit


def _case(rows, num_q_heads, num_kv_heads, head_dim, depth, mrope_section, dtype):
    gen = torch.Generator().manual_seed(rows * 31 + head_dim + depth)
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    x = torch.randn(rows, depth, generator=gen).to(dtype)
    weight = (torch.randn(width, depth, generator=gen) * depth ** -0.5).to(dtype)
    bias = torch.randn(width, generator=gen).to(dtype)
    cos_sin_cache = torch.randn(MAX_POSITION, head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, MAX_POSITION, (3, rows) if mrope_section else (rows,), generator=gen)
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=gen)[:rows]
    slots[1::3] = -1                                                      # tokens 1, 4, 7...: padding
    cache_shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    caches = torch.randn(cache_shape, generator=gen).to(dtype), torch.randn(cache_shape, generator=gen).to(dtype)
    return x, weight, bias, cos_sin_cache, positions, slots, caches


CASES = [  # rows, Hq, Hkv, head_dim, depth, num_splits, split_len, swap, mrope_section
    (1, 4, 2, 64, 600, 2, 512, False, None), (3, 4, 1, 32, 720, 3, 256, True, None),
    (7, 8, 2, 64, 1024, 4, 256, True, [8, 12, 12]), (5, 2, 2, 16, 130, 1, 256, False, None),
    (70, 4, 2, 32, 600, 2, 512, False, [4, 6, 6]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,num_q_heads,num_kv_heads,head_dim,depth,num_splits,split_len,swap,mrope_section",
                         CASES)
def test_fused_equals_product_then_rotary_store(rows, num_q_heads, num_kv_heads, head_dim, depth, num_splits,
                                                split_len, swap, mrope_section, dtype):
    x, weight, bias, cos_sin_cache, positions, slots, (k_cache, v_cache) = _case(
        rows, num_q_heads, num_kv_heads, head_dim, depth, mrope_section, dtype)
    tile = (matmul.swap_rows(rows) if swap else 64, 32, 64, 4, 2)
    for with_bias in (None, bias):
        k_want, v_want, k_got, v_got = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
        product = matmul.launch(x, weight, with_bias, tile, num_splits, split_len, two_launch=True, swap_ab=swap)
        query, key, value = linear_rotary.split_heads(product, num_q_heads, num_kv_heads)
        q_want = kernels.rotary_store_kv(query, key, value, positions, cos_sin_cache, k_want, v_want, slots,
                                         mrope_section)
        q_got = linear_rotary.launch(x, weight, with_bias, num_q_heads, num_kv_heads, positions, cos_sin_cache,
                                     k_got, v_got, slots, mrope_section, False, tile, num_splits, split_len,
                                     swap_ab=swap)
        assert torch.equal(q_got, q_want), with_bias is None
        assert torch.equal(k_got, k_want) and torch.equal(v_got, v_want), with_bias is None
        assert not torch.equal(k_got, k_cache)          # the cache was written
    # And against float64 math (HF's rotate_half on the projection), to the dtype's precision.
    k_oracle, v_oracle = k_cache.double(), v_cache.double()
    q_oracle = linear_rotary._reference(x.double(), weight.double(), bias.double(), num_q_heads, num_kv_heads,
                                        positions, cos_sin_cache.double(), k_oracle, v_oracle, slots,
                                        mrope_section, False)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(q_got.double(), q_oracle, **tol)
    torch.testing.assert_close(k_got.double(), k_oracle, **tol)
    torch.testing.assert_close(v_got.double(), v_oracle, **tol)


def test_dispatch_without_a_tuned_entry_runs_the_two_kernels():
    x, weight, bias, cos_sin_cache, positions, slots, (k_cache, v_cache) = _case(2, 4, 2, 32, 96, None,
                                                                                 torch.float32)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    query, key, value = linear_rotary.split_heads(kernels.batch_invariant_linear(x, weight, bias), 4, 2)
    q_want = kernels.rotary_store_kv(query, key, value, positions, cos_sin_cache, k_want, v_want, slots)
    q_got = kernels.batch_invariant_qkv_rotary_store_kv(x, weight, bias, 4, 2, positions, cos_sin_cache, k_cache,
                                                        v_cache, slots)
    assert torch.equal(q_got, q_want) and torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
