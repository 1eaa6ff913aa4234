"""Triton silu_and_mul (interpreter) against the torch reference. Run by tests/kernels/test_activation_kernel.py."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import vlserve_kernels as kernels

assert os.environ.get("TRITON_INTERPRET") == "1", "run via tests/kernels/test_activation_kernel.py"
activation_module = importlib.import_module("vlserve_kernels.activation")


@pytest.mark.parametrize("intermediate,dtype", [(24, torch.float32), (1500, torch.float16), (40, torch.bfloat16)])
def test_matches_reference(intermediate, dtype):
    x = torch.randn(3, 2 * intermediate, generator=torch.Generator().manual_seed(intermediate)).to(dtype)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(kernels.silu_and_mul(x), activation_module._reference(x), **tol)
