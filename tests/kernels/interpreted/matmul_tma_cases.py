"""kernels/matmul_tma.py (interpreter): the TMA / persistent large-M kernel gives the pointer
kernel's bits at the same tile and K ranges (only the tile schedule differs), with and without
bias, several K ranges, ragged edges. Run by tests/kernels/test_matmul_tma.py. float16: the
interpreter has no bfloat16 arithmetic."""

from __future__ import annotations

import os

import pytest
import torch

from vlserve_kernels import matmul, matmul_tma

assert os.environ.get("TRITON_INTERPRET") == "1", "run via tests/kernels/test_matmul_tma.py"


@pytest.mark.parametrize("rows,cols,depth,with_bias,num_splits,split_len", [
    (70, 96, 320, True, 1, 320), (70, 96, 320, True, 2, 256), (5, 64, 256, False, 1, 256),
    (130, 40, 512, True, 2, 256), (33, 200, 768, False, 3, 256)])
def test_same_bits_as_the_pointer_kernel(rows, cols, depth, with_bias, num_splits, split_len):
    gen = torch.Generator().manual_seed(rows + cols)
    x = torch.randn(rows, depth, generator=gen).to(torch.float16)
    weight = (torch.randn(cols, depth, generator=gen) * depth ** -0.5).to(torch.float16)
    bias = torch.randn(cols, generator=gen).to(torch.float16) if with_bias else None
    tile = (64, 32, 64, 4, 2)
    expected = matmul.launch(x, weight, bias, tile, num_splits, split_len)
    got = matmul_tma.launch(x, weight, bias, tile, num_splits, split_len)
    assert torch.equal(got, expected)
    for max_programs in (None, 2):   # one tile per program; several tiles (and K ranges) in one flat loop
        got = matmul_tma.launch(x, weight, bias, tile, num_splits, split_len, flat=True, max_programs=max_programs)
        assert torch.equal(got, expected), max_programs
    assert torch.equal(matmul_tma.launch(x, weight, bias, tile, num_splits, split_len, max_programs=2), expected)
    oracle = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    torch.testing.assert_close(got.double(), oracle, rtol=2e-2, atol=2e-2)


def test_refuses_a_split_that_tiles_do_not_divide():
    x, weight = torch.zeros(4, 256, dtype=torch.float16), torch.zeros(8, 256, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of BLOCK_K"):
        matmul_tma.launch(x, weight, None, (64, 32, 128, 4, 2), 2, 192)
