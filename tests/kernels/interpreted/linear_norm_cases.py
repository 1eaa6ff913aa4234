"""kernels/linear_norm.py (interpreter): the fused K-range sum + residual add + RMSNorm launch gives
the bits of the product (two-launch sum) followed by kernels/rmsnorm.py's fused add + norm, with and
without bias, one and several K ranges, plain and swapped tiles. Run by tests/kernels/test_linear_norm.py.
float32 and float16: the interpreter has no bfloat16 arithmetic."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import vlserve_kernels as kernels
from vlserve_kernels import matmul, rmsnorm

assert os.environ.get("TRITON_INTERPRET") == "1", "run via tests/kernels/test_linear_norm.py"
linear_norm = importlib.import_module("vlserve_kernels.linear_norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,hidden,depth,num_splits,split_len,swap", [
    (1, 48, 600, 2, 512, False), (3, 40, 720, 3, 256, True), (17, 64, 1024, 4, 256, True),
    (5, 40, 130, 1, 256, False), (70, 48, 600, 2, 512, False)])
def test_fused_equals_product_then_add_norm(rows, hidden, depth, num_splits, split_len, swap, dtype):
    gen = torch.Generator().manual_seed(rows * hidden + depth)
    x = torch.randn(rows, depth, generator=gen).to(dtype)
    weight = (torch.randn(hidden, depth, generator=gen) * depth ** -0.5).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype)
    norm_weight = (torch.randn(hidden, generator=gen) + 1).to(dtype)
    tile = (matmul.swap_rows(rows) if swap else 64, 32, 64, 4, 2)
    for bias in (None, torch.randn(hidden, generator=gen).to(dtype)):
        product = matmul.launch(x, weight, bias, tile, num_splits, split_len, two_launch=True, swap_ab=swap)
        want_normed, want_residual = rmsnorm._fused_add_triton(product, residual, norm_weight, 1e-6)
        normed, new_residual = linear_norm.launch(x, weight, bias, residual, norm_weight, 1e-6, tile, num_splits,
                                                  split_len, swap_ab=swap)
        assert torch.equal(new_residual, want_residual) and torch.equal(normed, want_normed), bias is None
    oracle_normed, oracle_residual = linear_norm._reference(x.double(), weight.double(), bias.double(),
                                                            residual.double(), norm_weight.double(), 1e-6)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(new_residual.double(), oracle_residual, **tol)
    torch.testing.assert_close(normed.double(), oracle_normed, **tol)


def test_dispatch_without_a_tuned_entry_runs_the_two_kernels():
    gen = torch.Generator().manual_seed(1)
    x, weight = torch.randn(2, 96, generator=gen), torch.randn(32, 96, generator=gen)
    residual, norm_weight = torch.randn(2, 32, generator=gen), torch.randn(32, generator=gen)
    normed, new_residual = kernels.batch_invariant_linear_add_rms_norm(x, weight, None, residual, norm_weight, 1e-6)
    want = kernels.fused_add_rms_norm(kernels.batch_invariant_linear(x, weight), residual, norm_weight, 1e-6)
    assert torch.equal(normed, want[0]) and torch.equal(new_residual, want[1])
