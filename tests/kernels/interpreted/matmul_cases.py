"""Triton batch-invariant linear (interpreter) against float64 x @ W^T + b, and row results equal
bit for bit whatever the number of rows and tile config. Run by tests/kernels/test_matmul_kernel.py."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import kernels

assert os.environ.get("TRITON_INTERPRET") == "1", "run via tests/kernels/test_matmul_kernel.py"
matmul_module = importlib.import_module("kernels.matmul")


@pytest.mark.parametrize("rows,cols,depth,with_bias", [(3, 40, 70, True), (1, 17, 64, False), (70, 33, 130, True)])
def test_matches_float64(rows, cols, depth, with_bias):
    gen = torch.Generator().manual_seed(rows * cols)
    x, weight = torch.randn(rows, depth, generator=gen), torch.randn(cols, depth, generator=gen)
    bias = torch.randn(cols, generator=gen) if with_bias else None
    out = kernels.batch_invariant_linear(x, weight, bias)
    expected = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


def test_rows_do_not_depend_on_batch_or_tiling():
    gen = torch.Generator().manual_seed(7)
    x, weight, bias = torch.randn(80, 96, generator=gen), torch.randn(48, 96, generator=gen), torch.randn(48, generator=gen)
    alone = matmul_module._triton(x[5:6], weight, bias)
    for rows, config in [(80, (64, 16, 4, 2)), (80, (64, 64, 4, 2)), (80, (128, 128, 8, 2)), (9, None), (80, None)]:
        got = matmul_module._triton(x[:rows], weight, bias, config)
        assert torch.equal(got[5:6], alone), (rows, config)


def test_split_k_rows_do_not_depend_on_batch():
    """K long enough for several K ranges: small M writes per-range sums (second kernel adds
    them), large M adds them in one program; a row's bits are the same either way."""
    gen = torch.Generator().manual_seed(11)
    depth, cols = 600, 48
    num_splits, split_len = matmul_module.k_split(cols, depth)
    assert num_splits == 2 and split_len == 512, (num_splits, split_len)
    x, weight, bias = torch.randn(70, depth, generator=gen), torch.randn(cols, depth, generator=gen), torch.randn(cols, generator=gen)
    alone = matmul_module._triton(x[3:4], weight, bias)
    expected = x[3:4].double() @ weight.double().T + bias.double()
    torch.testing.assert_close(alone.double(), expected, rtol=1e-5, atol=1e-4)
    for rows in (4, 64, 65, 70):
        got = matmul_module._triton(x[:rows], weight, bias)
        assert torch.equal(got[3:4], alone), rows
    torch.testing.assert_close(matmul_module._triton(x, weight, None).double(), x.double() @ weight.double().T,
                               rtol=1e-5, atol=1e-4)
