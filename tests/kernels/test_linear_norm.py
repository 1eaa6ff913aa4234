"""kernels.batch_invariant_linear_add_rms_norm: the CPU reference is the product then HF's residual
add and Qwen2RMSNorm; the fused Triton launch against the two kernels in the interpreter
(interpreted/linear_norm_cases.py, run in a child process)."""

from __future__ import annotations

import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

import vlserve_kernels as kernels


def test_reference_is_linear_then_hf_residual_add_and_norm():
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(3, 24, generator=gen), torch.randn(16, 24, generator=gen), torch.randn(16, generator=gen)
    residual = torch.randn(3, 16, generator=gen)
    norm = Qwen2RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=gen))
        new_residual = residual + torch.nn.functional.linear(x, weight, bias)
        expected = norm(new_residual)
    normed, got_residual = kernels.batch_invariant_linear_add_rms_norm(x, weight, bias, residual, norm.weight, 1e-6)
    assert torch.equal(got_residual, new_residual) and torch.equal(normed, expected)


def test_triton_kernel_in_interpreter(run_interpreted_cases):
    run_interpreted_cases("linear_norm_cases.py")
