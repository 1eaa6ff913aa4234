"""kernels/matmul_tma.py: the large-M TMA kernel against the pointer kernel's bits (interpreter,
child process), and which inputs it accepts."""

from __future__ import annotations

import torch

from vlserve_kernels import matmul_tma


def test_triton_kernel_in_interpreter(run_interpreted_cases):
    run_interpreted_cases("matmul_tma_cases.py")


def test_supports_only_aligned_16_bit_inputs():
    weight = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert matmul_tma.supports(torch.zeros(4, 64, dtype=torch.bfloat16), weight)
    assert not matmul_tma.supports(torch.zeros(4, 64), torch.zeros(8, 64))                  # float32
    assert not matmul_tma.supports(torch.zeros(4, 65, dtype=torch.bfloat16)[:, 1:], weight)  # unaligned rows
