"""kernels.batch_invariant_linear: the CPU path against F.linear's oracle (float64 matmul); the
Triton kernel in the interpreter (child process) against float64 and across batch sizes/tilings."""

from __future__ import annotations

import torch

import kernels


def test_reference_is_linear():
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(5, 12, generator=gen), torch.randn(7, 12, generator=gen), torch.randn(7, generator=gen)
    expected = x.double() @ weight.double().T + bias.double()
    torch.testing.assert_close(kernels.batch_invariant_linear(x, weight, bias).double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kernels.batch_invariant_linear(x, weight).double(), x.double() @ weight.double().T,
                               rtol=1e-6, atol=1e-6)


def test_triton_kernel_in_interpreter(run_interpreted_cases):
    run_interpreted_cases("matmul_cases.py")
