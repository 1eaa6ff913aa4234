"""Triton batch-invariant linear (interpreter) against float64 x @ W^T + b, and row results equal
bit for bit whatever the number of rows and tile config. Run by tests/kernels/test_matmul_kernel.py."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import vlserve_kernels as kernels

assert os.environ.get("TRITON_INTERPRET") == "1", "run via tests/kernels/test_matmul_kernel.py"
matmul_module = importlib.import_module("vlserve_kernels.matmul")


def exact(*shape, generator: torch.Generator) -> torch.Tensor:
    """Multiples of 1/8 in [-1, 1]: every product and every sum of up to 2**15 of them is exact in
    float32 (and the inputs in float16), so the bits these cases compare do not depend on the order in
    which the interpreter's NumPy matmul adds. That order changes with the CPU's BLAS kernel and the
    operand shapes (an AMD EPYC's differs from the machine's these cases were first run on); the order
    of the GPU's tensor-core sums is what bench/check_determinism.py and bench/tune_decode.py check."""
    return torch.randint(-8, 9, shape, generator=generator).float() / 8


@pytest.mark.parametrize("rows,cols,depth,with_bias", [(3, 40, 70, True), (1, 17, 64, False), (70, 33, 130, True)])
def test_matches_float64(rows, cols, depth, with_bias):
    gen = torch.Generator().manual_seed(rows * cols)
    x, weight = exact(rows, depth, generator=gen), exact(cols, depth, generator=gen)
    bias = exact(cols, generator=gen) if with_bias else None
    out = kernels.batch_invariant_linear(x, weight, bias)
    expected = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


def test_rows_do_not_depend_on_batch_or_tiling():
    gen = torch.Generator().manual_seed(7)
    x, weight, bias = exact(80, 96, generator=gen), exact(48, 96, generator=gen), exact(48, generator=gen)
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
    x, weight, bias = exact(70, depth, generator=gen), exact(cols, depth, generator=gen), exact(cols, generator=gen)
    alone = matmul_module._triton(x[3:4], weight, bias)
    expected = x[3:4].double() @ weight.double().T + bias.double()
    torch.testing.assert_close(alone.double(), expected, rtol=1e-5, atol=1e-4)
    for rows in (4, 64, 65, 70):
        got = matmul_module._triton(x[:rows], weight, bias)
        assert torch.equal(got[3:4], alone), rows
    torch.testing.assert_close(matmul_module._triton(x, weight, None).double(), x.double() @ weight.double().T,
                               rtol=1e-5, atol=1e-4)


# (rows, cols, depth, num_splits, split_len): K ranges 1, 2, 4 and 3 (the last one short, K not a
# multiple of BLOCK_K); rows across the small-M (partials) and large-M (one program) paths.
SPLIT_CASES = [(1, 40, 130, 1, 256), (3, 48, 600, 2, 512), (17, 48, 1024, 4, 256), (64, 33, 720, 3, 256),
               (65, 48, 600, 2, 512), (300, 40, 720, 3, 256)]


# bfloat16 is left out: the interpreter's tl.dot does not compute bf16 products (garbage values).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,cols,depth,num_splits,split_len", SPLIT_CASES)
def test_in_kernel_split_sum_equals_the_two_launch_sum(rows, cols, depth, num_splits, split_len, dtype):
    """The tile's last program sums the K ranges inside the GEMM launch: the same bits as the
    former second kernel (_sum_partials_kernel), with and without bias, and the tile counters are
    all back to zero afterwards (a CUDA graph replays the launch on the same counters)."""
    gen = torch.Generator().manual_seed(rows * depth + num_splits)
    x, weight = exact(rows, depth, generator=gen).to(dtype), exact(cols, depth, generator=gen).to(dtype)
    bias = exact(cols, generator=gen).to(dtype)
    tile = (64, 32 if rows <= 64 else 64, 64, 4, 2)
    for b in (None, bias):
        fused = matmul_module.launch(x, weight, b, tile, num_splits, split_len)
        oracle = matmul_module.launch(x, weight, b, tile, num_splits, split_len, two_launch=True)
        assert torch.equal(fused, oracle), (b is None, (fused.float() - oracle.float()).abs().max())
        assert torch.equal(matmul_module.launch(x, weight, b, tile, num_splits, split_len), fused)   # clean counters
    counters = matmul_module.TILE_COUNTERS.buffers.get(x.device)        # None until a launch has split partials
    assert counters is None or not counters.any()
    expected = x.double() @ weight.double().T + bias.double()
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(fused.double(), expected, **tol)


@pytest.mark.parametrize("depth", [600, 1024, 720])
def test_split_rows_equal_alone_inside_64_and_300(depth):
    """Rows computed alone (M = 1: in-kernel split sum) equal the same rows inside M = 64 (in-kernel
    split sum, other tiles) and M = 300 (one program walks every range)."""
    gen = torch.Generator().manual_seed(depth)
    x, weight = exact(300, depth, generator=gen).half(), exact(40, depth, generator=gen).half()
    bias = exact(40, generator=gen).half()
    assert matmul_module.k_split(40, depth)[0] > 1
    batched = {rows: matmul_module._triton(x[:rows], weight, bias) for rows in (64, 300)}
    for row in (0, 5, 63):
        alone = matmul_module._triton(x[row:row + 1], weight, bias)
        assert torch.equal(batched[64][row:row + 1], alone), row
        assert torch.equal(batched[300][row:row + 1], alone), row


# (rows, intermediate, depth): the [2I, depth] gate_up weight gets 1, 2, 4 and 3 K ranges (k_split).
SILU_CASES = [(1, 24, 130), (3, 24, 600), (17, 24, 1024), (64, 33, 720), (65, 20, 600), (300, 24, 720)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,intermediate,depth", SILU_CASES)
def test_fused_gate_up_silu_mul_equals_linear_then_activation(rows, intermediate, depth, dtype):
    """One launch for silu(x @ gate^T) * (x @ up^T): the bits of batch_invariant_linear on the
    [gate; up] weight followed by silu_and_mul, with and without bias, every M path."""
    gen = torch.Generator().manual_seed(rows + depth)
    x = exact(rows, depth, generator=gen).to(dtype)
    weight = (exact(2 * intermediate, depth, generator=gen) / 32).to(dtype)
    bias = exact(2 * intermediate, generator=gen).to(dtype)
    num_splits = matmul_module.k_split(2 * intermediate, depth)[0]
    assert num_splits == {130: 1, 600: 2, 1024: 4, 720: 3}[depth], num_splits
    for b in (None, bias):
        fused = kernels.batch_invariant_linear_silu_mul(x, weight, b)
        oracle = kernels.silu_and_mul(kernels.batch_invariant_linear(x, weight, b))
        assert fused.shape == (rows, intermediate) and fused.dtype == dtype
        assert torch.equal(fused, oracle), (b is None, (fused.float() - oracle.float()).abs().max())
    expected = matmul_module._reference_silu_mul(x.double(), weight.double(), bias.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused.double(), expected, **tol)
    counters = matmul_module.TILE_COUNTERS.buffers.get(x.device)
    assert counters is None or not counters.any()


def test_fused_silu_mul_rows_equal_alone_inside_64_and_300():
    gen = torch.Generator().manual_seed(3)
    x, weight = exact(300, 720, generator=gen).half(), (exact(48, 720, generator=gen) / 32).half()
    batched = {rows: kernels.batch_invariant_linear_silu_mul(x[:rows], weight) for rows in (64, 300)}
    for row in (0, 7, 63):
        alone = kernels.batch_invariant_linear_silu_mul(x[row:row + 1], weight)
        assert torch.equal(batched[64][row:row + 1], alone) and torch.equal(batched[300][row:row + 1], alone), row


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,cols,depth,num_splits,split_len", SPLIT_CASES[:4] + [(33, 40, 600, 2, 512)])
def test_swapped_small_m_product_equals_the_plain_one(rows, cols, depth, num_splits, split_len, dtype):
    """swap_ab computes w @ x^T with x's rows as the dot's narrow side (BLOCK_M 16 / 32 / 64 by M)
    and transposes: the same K ranges, the same products in the same order as the plain tile, with
    and without bias, the in-kernel and two-launch sums, and the fused SiLU (bench/tune_decode.py
    checks the bits on the GPU, where the tensor cores compute them)."""
    gen = torch.Generator().manual_seed(rows * depth + cols)
    x, weight = exact(rows, depth, generator=gen).to(dtype), exact(cols, depth, generator=gen).to(dtype)
    bias = exact(cols, generator=gen).to(dtype)
    plain_tile, swapped_tile = (64, 32, 64, 4, 2), (matmul_module.swap_rows(rows), 32, 64, 4, 2)
    for b in (None, bias):
        plain = matmul_module.launch(x, weight, b, plain_tile, num_splits, split_len)
        for two_launch in (False, True):
            got = matmul_module.launch(x, weight, b, swapped_tile, num_splits, split_len, two_launch=two_launch,
                                       swap_ab=True)
            assert got.shape == plain.shape
            torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6)
    expected = x.double() @ weight.double().T + bias.double()
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(got.double(), expected, **tol)
    if cols % 2 == 0:   # a [gate; up] weight
        silu = matmul_module.launch(x, weight, bias, swapped_tile, num_splits, split_len, silu_mul=True,
                                    swap_ab=True)
        torch.testing.assert_close(silu, kernels.silu_and_mul(plain), rtol=1e-6, atol=1e-6)
    counters = matmul_module.TILE_COUNTERS.buffers.get(x.device)
    assert counters is None or not counters.any()


def test_swap_rows_is_the_narrow_side_of_the_dot():
    assert [matmul_module.swap_rows(m) for m in (1, 16, 17, 32, 33, 64)] == [16, 16, 32, 32, 64, 64]



@pytest.mark.parametrize("rows,cols,depth,num_splits,split_len", [(1, 64, 512, 2, 256), (5, 40, 256, 1, 256),
                                                                  (33, 96, 768, 3, 256), (64, 64, 512, 4, 128)])
def test_swapped_product_with_tma_weight_tiles_has_the_same_bits(rows, cols, depth, num_splits, split_len):
    """w_tma: the swapped small-M product's weight tiles brought by TMA give the pointer tiles' bits:
    with and without bias, in-kernel and two-launch sums, the fused SiLU whose gate tile runs past the
    half (cols 40, tile 32: the up rows it reads only feed columns never stored). float16: the
    interpreter has no bfloat16 arithmetic."""
    gen = torch.Generator().manual_seed(rows + cols + depth)
    x = torch.randn(rows, depth, generator=gen).to(torch.float16)
    weight = (torch.randn(cols, depth, generator=gen) * depth ** -0.5).to(torch.float16)
    bias = torch.randn(cols, generator=gen).to(torch.float16)
    tile = (matmul_module.swap_rows(rows), 32, 64, 4, 2)
    for b in (None, bias):
        for two_launch in (False, True):
            pointer = matmul_module.launch(x, weight, b, tile, num_splits, split_len, two_launch=two_launch,
                                           swap_ab=True)
            tma = matmul_module.launch(x, weight, b, tile, num_splits, split_len, two_launch=two_launch,
                                       swap_ab=True, w_tma=True)
            assert torch.equal(tma, pointer)
    silu = [matmul_module.launch(x, weight, bias, tile, num_splits, split_len, silu_mul=True, swap_ab=True, w_tma=w)
            for w in (False, True)]
    assert torch.equal(silu[0], silu[1])
    counters = matmul_module.TILE_COUNTERS.buffers.get(x.device)
    assert counters is None or not counters.any()


def test_tma_weight_tiles_need_the_swapped_product_and_whole_k_tiles():
    x, weight = torch.zeros(1, 256, dtype=torch.float16), torch.zeros(64, 256, dtype=torch.float16)
    with pytest.raises(ValueError, match="w_tma"):
        matmul_module.launch(x, weight, None, (16, 32, 64, 4, 2), 1, 256, w_tma=True)
    with pytest.raises(ValueError, match="w_tma"):
        matmul_module.launch(x, weight, None, (16, 32, 128, 4, 2), 2, 192, swap_ab=True, w_tma=True)
