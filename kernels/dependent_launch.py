"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of one stream.

Why: a decode step is ~290 small kernels in a CUDA graph; between two of them the GPU drains the
first grid, then launches and ramps up the next (~1 us each, bench/pdl_probe.py). Launched with PDL,
a kernel's programs may become resident while the previous kernel still runs: they wait
(`griddepcontrol.wait`) for that kernel to finish and flush its memory, then let their own successor
launch (`griddepcontrol.launch_dependents`). H200, W2: 3.11 -> 2.90 ms/token (BENCHMARKS.md). Pulling
a product's weights into L2 before its wait (prefetch.global.L2) was measured slower (2.98 ms at 64 KiB
per program, 3.09 at 128 KiB) and is not done, nor is o_proj's programs pulling the first 16-48 MiB of the
next gate_up weight into L2 (cp.async.bulk.prefetch.L2) while attention runs (bucket 1 +25 to +76 us: the
prefetched bytes bought gate_up nothing; twelfth session); so was reading a product program's first weight tile, or
paged attention's first tile of context keys, into registers before the wait (H200 decode step, bucket 1
+12 / +102 us, bucket 64 +430 / +450 us; BENCHMARKS.md, tenth session).

The rule every kernel launched with PDL keeps: `wait_previous_kernel(PDL)` runs in every program
before any early return, before any store, and before any load of memory that the launch just before
it may write. Because each kernel releases its successor only after its own wait, a kernel that starts
early overlaps only its immediate predecessor: everything earlier in the stream has finished and its
stores are in L2. So a kernel may read, before its wait and through L2 (`.cg`), what only earlier
launches write: paged attention its request metadata and rotary_store_kv its positions, slot mapping
and cos/sin table, all written before the step's first layer; then only the previous layer op's output
stays on the critical path after the wait. Kernels whose inputs are built by the launch just before
them (the vision towers' rotary table) wait first.
VLSERVE_PDL=0 launches every kernel without it (bench A/B; same bits either way).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_ALLOWED = os.environ.get("VLSERVE_PDL", "1") != "0" and os.environ.get("TRITON_INTERPRET", "0") != "1"


@functools.lru_cache(maxsize=16)
def _device_supports(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(tensor: torch.Tensor) -> bool:
    """True when kernels on `tensor`'s device launch with PDL (a Hopper or later GPU, not VLSERVE_PDL=0)."""
    return _ALLOWED and tensor.is_cuda and _device_supports(tensor.device.index or 0)


@triton.jit
def wait_previous_kernel(PDL: tl.constexpr):
    """Blocks until the previous kernel of the stream has finished and its stores are visible, then
    lets the next kernel launch. A no-op without PDL (and in the interpreter, which has no PTX)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
