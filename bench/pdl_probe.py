"""Probe: programmatic dependent launch (PDL, kernels/dependent_launch.py) on this GPU + Triton.

A chain of N dependent small kernels (each reads the previous one's output) runs once eagerly from
zeros (its result checks the wait) and is then timed in a CUDA graph (tune_linear.graph_us), with and
without PDL: prints the check and the time per kernel. bench/check_kernels.py checks the real decode
kernels bit for bit over graph replays. Usage: python bench/pdl_probe.py
"""

import torch
import triton
import triton.language as tl

from vlserve_kernels.dependent_launch import wait_previous_kernel
from tune_linear import graph_us


@triton.jit
def _add_one_kernel(src_ptr, dst_ptr, n, PDL: tl.constexpr, BLOCK: tl.constexpr):
    wait_previous_kernel(PDL)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask) + 1.0, mask=mask)


def chain(a, b, length, pdl, programs):
    block = triton.next_power_of_2(triton.cdiv(a.numel(), programs))
    for i in range(length):
        src, dst = (a, b) if i % 2 == 0 else (b, a)
        _add_one_kernel[(triton.cdiv(a.numel(), block),)](src, dst, a.numel(), PDL=pdl, BLOCK=block,
                                                            launch_pdl=pdl)


def measure(pdl, programs, length=300, numel=1 << 16) -> tuple[bool, float]:
    """(the chain's result is right, us per kernel in a graph)."""
    a = torch.zeros(numel, device="cuda")
    b = torch.zeros_like(a)
    chain(a, b, length, pdl, programs)   # from zeros: the last buffer written holds `length`
    ok = bool(((a if length % 2 == 0 else b) == length).all())
    return ok, graph_us(lambda: chain(a, b, length, pdl, programs), calls=1) / length


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__)
    for programs in (1, 132, 512):
        for pdl in (False, True):
            ok, per_kernel = measure(pdl, programs)
            print(f"programs {programs:4d} pdl {pdl!s:5}: correct {ok}, {per_kernel:.2f} us per kernel in a graph")
