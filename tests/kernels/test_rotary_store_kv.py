"""kernels.rotary_store_kv: the Triton kernel equals kernels.apply_rotary followed by
kernels.store_kv of the rotated key, bit for bit, in the interpreter (child process); on the GPU
bench/check_kernels.py checks the compiled kernels the same way. The CPU path is those two
references in a row; the parity tests compare it with transformers end to end."""

from __future__ import annotations

import pytest
import torch

import vlserve_kernels as kernels


def _case(device, dtype, mrope_section=None, num_q_heads=16, num_kv_heads=2, head_dim=128):
    """One 5-token step: q/k/v, positions, a [64, head_dim] cos|sin table, two caches, slots with -1 padding."""
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


def test_rejects_positions_that_do_not_match_mrope():
    query, key, value, positions, cos_sin_cache, (k_cache, v_cache), slot_mapping = _case("cpu", torch.float32)
    with pytest.raises(ValueError, match="mrope_section"):
        kernels.rotary_store_kv(query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                mrope_section=[16, 24, 24])


def test_triton_kernel_in_interpreter(run_interpreted_cases):
    run_interpreted_cases("rotary_store_kv_cases.py")
