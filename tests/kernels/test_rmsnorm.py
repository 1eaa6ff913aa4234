"""kernels.rms_norm / fused_add_rms_norm: the reference against transformers' Qwen2RMSNorm (and HF's
residual add in the input dtype); the Triton kernel against the reference in the interpreter."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

import vlserve_kernels as kernels


def _hf_norm(hidden, dtype, eps, seed=0):
    norm = Qwen2RMSNorm(hidden, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(seed)) + 1)
    return norm.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_matches_qwen2_rmsnorm(dtype):
    norm = _hf_norm(48, dtype, 1e-6)
    x = (torch.randn(5, 48) * 3).to(dtype)
    with torch.no_grad():
        expected = norm(x)
    assert torch.equal(kernels.rms_norm(x, norm.weight.detach(), 1e-6), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_matches_hf_residual_then_norm(dtype):
    norm = _hf_norm(40, dtype, 1e-5, seed=1)
    x, residual = torch.randn(3, 40).to(dtype), torch.randn(3, 40).to(dtype)
    with torch.no_grad():
        new_residual = residual + x                 # HF decoder layer: hidden = residual + hidden
        expected = norm(new_residual)
    normed, residual_out = kernels.fused_add_rms_norm(x, residual, norm.weight.detach(), 1e-5)
    assert torch.equal(residual_out, new_residual) and torch.equal(normed, expected)


def test_triton_kernel_in_interpreter(run_interpreted_cases):
    run_interpreted_cases("rmsnorm_cases.py")
