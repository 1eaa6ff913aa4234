"""kernels.store_kv: the reference against a per-token loop writing slot // block_size,
slot % block_size; the Triton kernel against the reference in the interpreter (child process)."""

from __future__ import annotations

import pytest
import torch

import vlserve_kernels as kernels


def _expected_caches(key, value, k_cache, v_cache, slot_mapping):
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_expected[slot // block_size, slot % block_size] = key[t]
            v_expected[slot // block_size, slot % block_size] = value[t]
    return k_expected, v_expected


@pytest.mark.parametrize("block_size", [1, 8, 16])
def test_reference_writes_each_slot_and_skips_padding(block_size):
    gen = torch.Generator().manual_seed(block_size)
    key, value = torch.randn(6, 2, 8, generator=gen), torch.randn(6, 2, 8, generator=gen)
    k_cache, v_cache = torch.randn(5, block_size, 2, 8, generator=gen), torch.randn(5, block_size, 2, 8, generator=gen)
    slot_mapping = torch.tensor([3, -1, 5 * block_size - 1, 0, -1, 2 * block_size + 1])
    k_expected, v_expected = _expected_caches(key, value, k_cache, v_cache, slot_mapping)
    kernels.store_kv(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


def test_reference_casts_to_cache_dtype():
    key = torch.randn(2, 1, 4)
    k_cache, v_cache = torch.zeros(2, 4, 1, 4, dtype=torch.bfloat16), torch.zeros(2, 4, 1, 4, dtype=torch.bfloat16)
    kernels.store_kv(key, -key, k_cache, v_cache, torch.tensor([7, 1]))
    assert torch.equal(k_cache[1, 3], key[0].bfloat16()) and torch.equal(v_cache[0, 1], -key[1].bfloat16())


def test_triton_kernel_in_interpreter(run_interpreted_cases):
    run_interpreted_cases("store_kv_cases.py")
