"""Batch-invariant linear for mid and large M (wide decode batches, prefill, mixed steps) on Hopper: the same
arithmetic as `kernels/matmul.py`'s `_linear_kernel` (fixed K ranges, one fp32 accumulator per
range fed by tensor-core dots in K order, ranges summed in order, bias, one rounding), with the
tiles brought in by the bulk tensor copy engine (TMA descriptors: no address math or masks per
load, out-of-range rows and columns arrive as zeros) and a persistent grid (one program per SM
walking output tiles: no compile and no grid per M).

Caller: `kernels.matmul._triton` when the GPU's tuned table names a "mid_tma" / "large_tma" tile
for the weight's shape (bench/tune_linear.py --range mid|large checks every candidate bit-equal to the rows
computed alone at M = 1 before it writes one). Only the tile schedule differs from the pointer
kernel: which program computes an element, never how, so rows keep their bits across M.

Two loop shapes, the same additions: nested (a program's tiles, each tile's K ranges, each range's K
blocks; the software pipeline refills at every range and tile, which the small-M K split makes
short: 8-16 blocks for qkv and o) and flat (one loop over the program's (tile, K block) pairs, the
table's "mid_tma_flat" / "large_tma_flat"; added in the eighth session, not yet timed on a GPU, so no
table entry uses it: bench/tune_linear.py --range mid|large sweeps both shapes).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

import vlserve_kernels.dependent_launch as dependent_launch
from vlserve_kernels.dependent_launch import wait_previous_kernel
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit(do_not_specialize=["M", "NUM_SPLITS", "num_programs"])
def _linear_tma_kernel(
    x_desc, w_desc, bias_ptr, out_ptr, M, N, K, stride_om, SPLIT_LEN, NUM_SPLITS, num_programs,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, FLAT: tl.constexpr, PDL: tl.constexpr,
):
    wait_previous_kernel(PDL)
    # num_programs is a run-time value (the grid is min(tiles, SMs)): no compile per M.
    # x_desc tiles [BLOCK_M, BLOCK_K] of x [M, K]; w_desc tiles [BLOCK_N, BLOCK_K] of weight [N, K].
    if FLAT:
        _flat_tiles(x_desc, w_desc, bias_ptr, out_ptr, M, N, K, stride_om, SPLIT_LEN, num_programs,
                    HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _nested_tiles(x_desc, w_desc, bias_ptr, out_ptr, M, N, K, stride_om, SPLIT_LEN, NUM_SPLITS, num_programs,
                      HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _nested_tiles(x_desc, w_desc, bias_ptr, out_ptr, M, N, K, stride_om, SPLIT_LEN, NUM_SPLITS, num_programs,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    # A loop over this program's tiles, in it one over K ranges, in it one over a range's K blocks
    # (the software pipeline refills at every range and tile).
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_m * num_n, num_programs):
        pid_m, pid_n = _tile_position(tile, num_m, num_n, GROUP_M)
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for split in range(0, NUM_SPLITS):
            k_lo = split * SPLIT_LEN
            k_hi = tl.minimum(k_lo + SPLIT_LEN, K)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):   # K past the end arrives as zeros, as the masked loads
                a = x_desc.load([pid_m * BLOCK_M, k0])                               # [BLOCK_M, BLOCK_K]
                b = w_desc.load([pid_n * BLOCK_N, k0])                               # [BLOCK_N, BLOCK_K]
                acc = tl.dot(a, b.T, acc)
            total += acc
        _store_tile(total, bias_ptr, out_ptr, pid_m, pid_n, M, N, stride_om, HAS_BIAS, BLOCK_M, BLOCK_N)


@triton.jit
def _flat_tiles(x_desc, w_desc, bias_ptr, out_ptr, M, N, K, stride_om, SPLIT_LEN, num_programs,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr):
    # The same tiles and sums as _nested_tiles, walked as ONE loop over this program's (tile, K block)
    # pairs (Triton's persistent-matmul pattern), so the software pipeline runs on across K ranges
    # and tiles: a range's accumulator is added to `total` at the range's last block and restarts
    # from zero, a tile is stored at its last block. Same additions in the same order. The number of
    # ranges follows from K and SPLIT_LEN (a multiple of BLOCK_K).
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    k_blocks = tl.cdiv(K, BLOCK_K)
    blocks_per_split = SPLIT_LEN // BLOCK_K
    my_tiles = tl.cdiv(num_m * num_n - tl.program_id(0), num_programs)
    tile = tl.program_id(0) - num_programs
    kb = k_blocks - 1
    pid_m, pid_n = 0, 0
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(0, my_tiles * k_blocks):
        kb = tl.where(kb == k_blocks - 1, 0, kb + 1)
        if kb == 0:
            tile += num_programs
            pid_m, pid_n = _tile_position(tile, num_m, num_n, GROUP_M)
        a = x_desc.load([pid_m * BLOCK_M, kb * BLOCK_K])                             # [BLOCK_M, BLOCK_K]
        b = w_desc.load([pid_n * BLOCK_N, kb * BLOCK_K])                             # [BLOCK_N, BLOCK_K]
        acc = tl.dot(a, b.T, acc)
        if (kb % blocks_per_split == blocks_per_split - 1) or (kb == k_blocks - 1):   # a K range ends
            total += acc
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if kb == k_blocks - 1:                                                      # the tile ends
            _store_tile(total, bias_ptr, out_ptr, pid_m, pid_n, M, N, stride_om, HAS_BIAS, BLOCK_M, BLOCK_N)
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)


@triton.jit
def _tile_position(tile, num_m, num_n, GROUP_M: tl.constexpr):
    # Output tile -> (row tile, column tile), row tiles grouped by GROUP_M so weight tiles stay in L2.
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


@triton.jit
def _store_tile(total, bias_ptr, out_ptr, pid_m, pid_n, M, N, stride_om, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # out[tile] = round(total + bias): the one rounding to the output dtype.
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    if HAS_BIAS:
        total += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out, total.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides, and 16-bit inputs here (float32 keeps the
    pointer kernel's IEEE dots)."""
    return (x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and x.stride(-1) == 1 and weight.stride(-1) == 1
            and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0
            and (x.stride(0) * x.element_size()) % 16 == 0 and (weight.stride(0) * weight.element_size()) % 16 == 0)


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           tile: tuple[int, int, int, int, int], num_splits: int, split_len: int, flat: bool = False,
           max_programs: int | None = None) -> torch.Tensor:
    """x [M, K], weight [N, K] -> [M, N] in x.dtype; tile = (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    num_stages); K ranges as `kernels.matmul.k_split` gives them (split_len a multiple of BLOCK_K).
    flat: one pipelined loop over the program's tiles and K blocks (_flat_tiles), the same bits.
    max_programs: the persistent grid's size (default: the SM count on CUDA, one program per tile elsewhere)."""
    num_rows, num_cols = x.shape[0], weight.shape[0]
    out = x.new_empty((num_rows, num_cols))
    if num_rows == 0:
        return out
    block_m, block_n, block_k, num_warps, num_stages = tile
    if split_len % block_k:
        raise ValueError(f"split_len {split_len} is not a multiple of BLOCK_K {block_k}")
    x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [block_n, block_k])
    num_tiles = triton.cdiv(num_rows, block_m) * triton.cdiv(num_cols, block_n)
    programs = max_programs or (_num_sms(x.device.index or 0) if x.is_cuda else num_tiles)
    num_programs = min(num_tiles, programs)
    _linear_tma_kernel[(num_programs,)](
        x_desc, w_desc, bias if bias is not None else weight, out, num_rows, num_cols, x.shape[1],
        out.stride(0), split_len, num_splits, num_programs, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP_M=8, FLAT=flat, PDL=(pdl := dependent_launch.enabled(x)), num_warps=num_warps,
        num_stages=num_stages, launch_pdl=pdl)
    return out
