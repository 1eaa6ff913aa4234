"""kernels.rotary_store_kv: on the CPU (torch reference) and on CUDA (Triton) it must equal
kernels.apply_rotary followed by kernels.store_kv of the rotated key, bit for bit; the Triton
kernel is checked the same way in the interpreter (child process)."""

from __future__ import annotations

import pytest
import torch

import kernels


def _case(device, dtype, mrope_section=None, num_q_heads=16, num_kv_heads=2, head_dim=128):
    gen = torch.Generator().manual_seed(head_dim)
    query = torch.randn(5, num_q_heads, head_dim, generator=gen).to(device, dtype)
    key, value = (torch.randn(5, num_kv_heads, head_dim, generator=gen).to(device, dtype) for _ in range(2))
    freqs = torch.arange(64.0)[:, None] / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    cos_sin_cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device, dtype)     # [64, head_dim]
    shape = (3, 5) if mrope_section else (5,)
    positions = torch.randint(0, 64, shape, generator=gen).to(device)
    caches = [torch.zeros(4, 8, num_kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2)]
    slot_mapping = torch.tensor([9, -1, 0, 31, -1], device=device)
    return query, key, value, positions, cos_sin_cache, caches, slot_mapping


def _fused_equals_unfused(device, dtype, mrope_section=None, interleaved=False):
    query, key, value, positions, cos_sin_cache, (k_cache, v_cache), slot_mapping = _case(device, dtype, mrope_section)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    q_expected, k_rotated = kernels.apply_rotary(query, key, positions, cos_sin_cache, mrope_section, interleaved)
    kernels.store_kv(k_rotated, value, k_expected, v_expected, slot_mapping)
    q_out = kernels.rotary_store_kv(query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                    mrope_section, interleaved)
    assert torch.equal(q_out, q_expected)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)
    assert k_cache[0, 0].abs().sum() > 0 and k_cache[0, 1].abs().sum() == 0   # slot 0 written, slot 1 not


MROPE_CASES = [(None, False), ([16, 24, 24], False), ([24, 20, 20], True)]


@pytest.mark.parametrize("mrope_section,interleaved", MROPE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_apply_rotary_then_store_kv(dtype, mrope_section, interleaved):
    _fused_equals_unfused("cpu", dtype, mrope_section, interleaved)


def test_rejects_positions_that_do_not_match_mrope():
    query, key, value, positions, cos_sin_cache, (k_cache, v_cache), slot_mapping = _case("cpu", torch.float32)
    with pytest.raises(ValueError, match="mrope_section"):
        kernels.rotary_store_kv(query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                mrope_section=[16, 24, 24])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled kernels, not the interpreter")
@pytest.mark.parametrize("mrope_section,interleaved", MROPE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_equals_the_unfused_kernels(dtype, mrope_section, interleaved):
    """The compiler may contract x1*cos - x2*sin into an FMA differently in the two kernels."""
    _fused_equals_unfused("cuda", dtype, mrope_section, interleaved)


def test_triton_kernel_in_interpreter(run_interpreted_cases):
    run_interpreted_cases("rotary_store_kv_cases.py")
