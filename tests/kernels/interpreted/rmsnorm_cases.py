"""Triton RMSNorm kernels (interpreter) against the torch references. Run by tests/kernels/test_rmsnorm.py."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import vlserve_kernels as kernels

assert os.environ.get("TRITON_INTERPRET") == "1", "run via tests/kernels/test_rmsnorm.py"
rmsnorm_module = importlib.import_module("vlserve_kernels.rmsnorm")


@pytest.mark.parametrize("hidden,dtype", [(48, torch.float32), (64, torch.float16), (40, torch.bfloat16)])
def test_matches_reference(hidden, dtype):
    gen = torch.Generator().manual_seed(hidden)
    x, residual = (torch.randn(4, hidden, generator=gen) * 3).to(dtype), torch.randn(4, hidden, generator=gen).to(dtype)
    weight = (torch.randn(hidden, generator=gen) + 1).to(dtype)
    # Half precision: the interpreter truncates float32 -> bfloat16 casts (2 casts here: up to 2 ulp).
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-6), rmsnorm_module._reference(x, weight, 1e-6), **tol)
    normed, new_residual = kernels.fused_add_rms_norm(x, residual, weight, 1e-6)
    expected_normed, expected_residual = rmsnorm_module._fused_add_reference(x, residual, weight, 1e-6)
    torch.testing.assert_close(new_residual, expected_residual, **tol)   # bf16: interpreter casts truncate
    torch.testing.assert_close(normed, expected_normed, **tol)
