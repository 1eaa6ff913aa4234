"""Probe: programmatic dependent launch (PDL) on this GPU + Triton, inside a CUDA graph.

A chain of N dependent small kernels (each reads the previous one's output) is captured in a CUDA graph
with and without PDL; prints the result check and the time per kernel. Usage: python bench/pdl_probe.py
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _add_one_kernel(src_ptr, dst_ptr, n, PDL: tl.constexpr, BLOCK: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask) + 1.0, mask=mask)


def chain(a, b, length, pdl, programs):
    block = triton.cdiv(a.numel(), programs)
    block = triton.next_power_of_2(block)
    for i in range(length):
        src, dst = (a, b) if i % 2 == 0 else (b, a)
        _add_one_kernel[(triton.cdiv(a.numel(), block),)](src, dst, a.numel(), PDL=pdl, BLOCK=block,
                                                            launch_pdl=pdl)


def measure(pdl, programs, length=300, numel=1 << 16):
    a = torch.zeros(numel, device="cuda")
    b = torch.zeros(numel, device="cuda")
    chain(a, b, 2, pdl, programs)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            chain(a, b, length, pdl, programs)
    torch.cuda.synchronize()
    a.zero_()
    b.zero_()
    graph.replay()
    torch.cuda.synchronize()
    result = (a if length % 2 == 0 else b)
    ok = bool((result == length).all())
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / length)
    times.sort()
    return ok, times[len(times) // 2]


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__)
    for programs in (1, 132, 512):
        for pdl in (False, True):
            ok, per_kernel = measure(pdl, programs)
            print(f"programs {programs:4d} pdl {pdl!s:5}: correct {ok}, {per_kernel:.2f} us per kernel in a graph")
