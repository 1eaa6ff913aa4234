"""kernels.batch_invariant_linear: the CPU path against F.linear's oracle (float64 matmul); the
Triton kernel in the interpreter (child process) against float64 and across batch sizes/tilings."""

from __future__ import annotations

import torch

import vlserve_kernels as kernels


def test_reference_is_linear():
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(5, 12, generator=gen), torch.randn(7, 12, generator=gen), torch.randn(7, generator=gen)
    expected = x.double() @ weight.double().T + bias.double()
    torch.testing.assert_close(kernels.batch_invariant_linear(x, weight, bias).double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kernels.batch_invariant_linear(x, weight).double(), x.double() @ weight.double().T,
                               rtol=1e-6, atol=1e-6)


def test_triton_kernel_in_interpreter(run_interpreted_cases):
    run_interpreted_cases("matmul_cases.py")


def test_pipeline_stages_fit_shared_memory_for_every_dtype():
    from vlserve_kernels.matmul import BLOCK_K, fit_num_stages, tile_config

    assert fit_num_stages(128, 256, 3, 2) == 3   # bf16: 3 x 48 KiB
    assert fit_num_stages(128, 256, 3, 4) == 2   # float32: 3 x 96 KiB would not fit in 227 KiB
    for rows in (1, 64, 100, 512, 513, 4096):
        for cols in (2048, 4097, 151936):
            block_m, block_n, _, stages = tile_config(rows, cols)
            for element_size in (2, 4):
                used = fit_num_stages(block_m, block_n, stages, element_size) * (block_m + block_n) * BLOCK_K * element_size
                assert used <= 227 * 1024


def test_k_split_depends_on_the_weight_shape_only():
    from vlserve_kernels.matmul import BLOCK_K, k_split

    # Qwen2.5-VL-3B decode shapes: o_proj and down_proj get several K ranges, wide ones none.
    assert k_split(2048, 2048) == (8, 256)
    assert k_split(2048, 11008) == (8, 1536)
    assert k_split(151936, 2048) == (1, 2048)
    for cols, depth in ((2560, 2048), (48, 600), (7, 64), (22016, 2048), (3584, 18944)):
        splits, split_len = k_split(cols, depth)
        assert split_len % (4 * BLOCK_K) == 0                     # every BLOCK_K up to 256 divides it
        assert splits * split_len >= depth > (splits - 1) * split_len   # every K element in exactly one range
