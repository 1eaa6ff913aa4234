"""Triton rotary kernel (interpreter) against the torch reference. Run by tests/kernels/test_rotary_kernel.py."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import vlserve_kernels as kernels

assert os.environ.get("TRITON_INTERPRET") == "1", "run via tests/kernels/test_rotary_kernel.py"
rotary_module = importlib.import_module("vlserve_kernels.rotary")


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,mrope_section,dtype,interleaved", [
    (4, 2, 16, None, torch.float32, False), (7, 1, 24, None, torch.float16, False),
    (4, 2, 16, [2, 3, 3], torch.float32, False), (3, 3, 32, [4, 6, 6], torch.float16, False),
    (4, 2, 16, [2, 3, 3], torch.float32, True), (8, 1, 128, [24, 20, 20], torch.float16, True)])
def test_matches_reference(num_q_heads, num_kv_heads, head_dim, mrope_section, dtype, interleaved):
    gen = torch.Generator().manual_seed(head_dim)
    query = torch.randn(5, num_q_heads, head_dim, generator=gen).to(dtype)
    key = torch.randn(5, num_kv_heads, head_dim, generator=gen).to(dtype)
    cos_sin_cache = torch.randn(20, head_dim, generator=gen)
    shape = (3, 5) if mrope_section else (5,)
    positions = torch.randint(0, 20, shape, generator=gen)
    out = kernels.apply_rotary(query, key, positions, cos_sin_cache, mrope_section, interleaved)
    expected = rotary_module._reference(query, key, positions, cos_sin_cache, mrope_section, interleaved)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, **tol)
