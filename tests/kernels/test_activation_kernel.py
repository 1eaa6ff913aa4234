"""kernels.silu_and_mul: the reference against HF Qwen2MLP's act_fn(gate) * up; the Triton kernel
against the reference in the interpreter (child process)."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

import vlserve_kernels as kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_hf_swiglu(dtype):
    gate, up = torch.randn(4, 24).to(dtype), torch.randn(4, 24).to(dtype)
    expected = ACT2FN["silu"](gate) * up
    got = kernels.silu_and_mul(torch.cat([gate, up], dim=-1))
    # Not bit-equal: torch's vectorised silu on a strided half of x rounds differently by ~1 ulp.
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, **tol)


def test_triton_kernel_in_interpreter(run_interpreted_cases):
    run_interpreted_cases("activation_cases.py")
