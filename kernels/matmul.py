"""Batch-invariant linear layer: out[M, N] = x[M, K] @ weight[N, K]^T (+ bias), where every row's
arithmetic is the same whatever M is (split-K fixed by the weight's shape, no kernel choice by M).

Caller: `kernels.batch_invariant_linear` (dispatch in `kernels/__init__.py`), from the engine's
linear layers when DeviceConfig.deterministic is on (the default). cuBLAS picks its kernel (tile
shape, split-K, stream-K) by M, so a request's logits change with what else is in the batch;
here each output element is a fixed number of fp32 accumulators, one per K range (the ranges
depend on the weight's [N, K] only), each fed by tl.dot over its range in BLOCK_K steps, summed in
range order, then the bias is added and the sum rounded once. Small M (<= 64) runs one program
per (tile, range) (many programs stream the weight: decode is bandwidth-bound); each writes its
range's fp32 sum to partial[S, M, N] and takes a ticket on the tile's counter (an acq_rel atomic),
and the tile's last program re-reads the S sums in range order and finishes the tile in the same
launch (counters: `TILE_COUNTERS`, reset by that program). Large M adds the ranges inside one
program (no extra traffic). The additions are the same either way, and the same as the former
second kernel (`launch(two_launch=True)`, kept as the oracle). BLOCK_K and the instruction family
(tensor-core dot with >= 64 rows) are fixed; only BLOCK_N (and the grid) grow with M, which
changes which program computes an element, not how. bench/check_determinism.py checks the
row results bit for bit across M on the GPU.

`kernels.batch_invariant_linear_silu_mul` (the MLP's gate_up + SiluAndMul in deterministic mode)
runs the same kernel with SILU_MUL: a program computes columns n of the gate half and of the up
half of the [2I, K] weight, each exactly as the plain product does (that weight's K split), rounds
both, and applies kernels/activation.py's `silu_mul`: one launch instead of two, same bits.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

import vlserve_kernels.matmul_tma as matmul_tma
import vlserve_kernels.dependent_launch as dependent_launch
from vlserve_kernels.activation import _reference as _activation_reference
from vlserve_kernels.activation import _triton as _activation_triton
from vlserve_kernels.activation import silu_mul
from vlserve_kernels.dependent_launch import wait_previous_kernel
from vlserve_kernels.ticket_counters import TicketCounters

BLOCK_K = 64


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


# SPLIT_LEN stays specialised: it is always a multiple of 256, and Triton's "divisible by 16"
# specialisation is what lets the loads be 16-byte vectors (without it they run 4x slower).
@triton.jit(do_not_specialize=["M", "NUM_SPLITS"])
def _linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, partial_ptr, counter_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    stride_pm, SPLIT_LEN, NUM_SPLITS,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, IS_FP32: tl.constexpr, WRITE_PARTIAL: tl.constexpr, SUM_IN_KERNEL: tl.constexpr,
    SILU_MUL: tl.constexpr, SWAP_AB: tl.constexpr, PDL: tl.constexpr, W_TMA: tl.constexpr = False,
):
    # Program -> (row tile, column tile), row tiles grouped by GROUP_M so weight tiles stay in L2.
    # K is cut into NUM_SPLITS ranges of SPLIT_LEN elements (fixed by the weight's shape, never by
    # M; a multiple of every BLOCK_K used). Each range gets its own fp32 accumulator from zero, fed
    # by tensor-core dots in K order, and the ranges are summed in order: ((0 + acc_0) + acc_1) + ...
    # WRITE_PARTIAL (small M): program axis 1 is the range, its accumulator goes to partial[s, M, :]
    # and the tile's last program to finish (SUM_IN_KERNEL; else _sum_partials_kernel) adds them in
    # the same order; otherwise one program walks every range itself. Same arithmetic either way.
    # SILU_MUL: the weight is [gate; up] (2N rows), out [M, N] = silu(gate cols) * (up cols): each
    # half computed as the plain product of the [2N, K] weight computes it (partial [S, M, 2N]).
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)                   # [BLOCK_M]
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)                   # [BLOCK_N]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    first_split, last_split = 0, NUM_SPLITS
    if WRITE_PARTIAL:
        first_split, last_split = tl.program_id(1), tl.program_id(1) + 1
    wait_previous_kernel(PDL)
    if W_TMA:   # w_ptr is a TMA descriptor of the weight (SWAP_AB at small M): the same products
        total = _range_sums_tma(x_ptr, w_ptr, 0, pid_n, rows, M, K, stride_xm, first_split, last_split,
                                SPLIT_LEN, BLOCK_M, BLOCK_N, BLOCK_K)                # [BLOCK_M, BLOCK_N] fp32
        total_up = total
        if SILU_MUL:
            total_up = _range_sums_tma(x_ptr, w_ptr, N, pid_n, rows, M, K, stride_xm, first_split, last_split,
                                       SPLIT_LEN, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        total = _range_sums(x_ptr, w_ptr, rows, cols, M, N, K, stride_xm, stride_wn, first_split, last_split,
                            SPLIT_LEN, BLOCK_M, BLOCK_N, BLOCK_K, IS_FP32, SWAP_AB)   # [BLOCK_M, BLOCK_N] fp32
        total_up = total
        if SILU_MUL:
            total_up = _range_sums(x_ptr, w_ptr + N * stride_wn, rows, cols, M, N, K, stride_xm, stride_wn,
                                   first_split, last_split, SPLIT_LEN, BLOCK_M, BLOCK_N, BLOCK_K, IS_FP32, SWAP_AB)
    if WRITE_PARTIAL:
        partial = partial_ptr + (tl.program_id(1) * M + rows[:, None]) * stride_pm + cols[None, :]
        tl.store(partial, total, mask=mask)
        if SILU_MUL:
            tl.store(partial + N, total_up, mask=mask)
        if SUM_IN_KERNEL:
            if _last_to_finish(counter_ptr + pid, NUM_SPLITS):
                total = _sum_partials(partial_ptr, rows, cols, mask, M, stride_pm, NUM_SPLITS, BLOCK_M, BLOCK_N)
                if SILU_MUL:
                    total_up = _sum_partials(partial_ptr + N, rows, cols, mask, M, stride_pm, NUM_SPLITS,
                                             BLOCK_M, BLOCK_N)
                tl.store(counter_ptr + pid, 0)        # clean for the next launch / graph replay
                _epilogue(total, total_up, bias_ptr, out_ptr, rows, cols, mask, N, stride_om, HAS_BIAS, SILU_MUL)
    else:
        _epilogue(total, total_up, bias_ptr, out_ptr, rows, cols, mask, N, stride_om, HAS_BIAS, SILU_MUL)


@triton.jit
def _range_sums(x_ptr, w_ptr, rows, cols, M, N, K, stride_xm, stride_wn, first_split, last_split, SPLIT_LEN,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IS_FP32: tl.constexpr,
                SWAP_AB: tl.constexpr):
    # ((0 + acc_first) + ...) + acc_{last - 1}: [BLOCK_M, BLOCK_N] fp32 for x[rows] @ w[cols]^T over
    # K ranges [first_split, last_split), each range its own accumulator fed in K order.
    # SWAP_AB (small M): the same products as w[cols] @ x[rows]^T, [BLOCK_N, BLOCK_M], transposed at
    # the end: the weight is the tensor core's 64-row operand and x's few rows its narrow one (N >= 16),
    # so the shared memory of a stage holds weight, not 64 rows of mostly-masked x. Each element is
    # the same k-ordered sum of the same products (bench/tune_decode.py checks the bits on the GPU).
    ks = tl.arange(0, BLOCK_K)
    if SWAP_AB:
        total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for split in range(first_split, last_split):
        k_lo = tl.multiple_of(split * SPLIT_LEN, 256)
        k_hi = tl.minimum(k_lo + SPLIT_LEN, K)
        if SWAP_AB:
            w_tile = w_ptr + cols[:, None] * stride_wn + (k_lo + ks)[None, :]       # [BLOCK_N, BLOCK_K]
            x_tile = x_ptr + rows[None, :] * stride_xm + (k_lo + ks)[:, None]       # [BLOCK_K, BLOCK_M]
            total += _range_dot(w_tile, cols, N, x_tile, rows, M, k_lo, k_hi, ks, BLOCK_N, BLOCK_M, BLOCK_K, IS_FP32)
        else:
            x_tile = x_ptr + rows[:, None] * stride_xm + (k_lo + ks)[None, :]       # [BLOCK_M, BLOCK_K]
            w_tile = w_ptr + cols[None, :] * stride_wn + (k_lo + ks)[:, None]       # [BLOCK_K, BLOCK_N]
            total += _range_dot(x_tile, rows, M, w_tile, cols, N, k_lo, k_hi, ks, BLOCK_M, BLOCK_N, BLOCK_K, IS_FP32)
    if SWAP_AB:
        total = tl.trans(total)
    return total


@triton.jit
def _range_sums_tma(x_ptr, w_desc, w_row0, pid_n, rows, M, K, stride_xm, first_split, last_split, SPLIT_LEN,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # _range_sums' SWAP_AB products, the weight tiles [BLOCK_N, BLOCK_K] (rows w_row0 + the column
    # tile's) brought by the tensor copy engine: one instruction a tile instead of every thread's
    # address math and copies (Nsight Compute, H200: down_proj at M = 1 runs ~3,700 instructions per
    # warp at ~6 cycles each and reaches 60% of DRAM bandwidth). The same dot on the same values:
    # rows past the weight's end arrive as zeros; rows past N (a merged weight's other half) only
    # feed columns that are never stored. K ranges are whole BLOCK_K multiples (k_split), so a tile
    # never reaches into the next range; x keeps its masks. The table's "tile_tma" turns it on per
    # shape; no H200 entry does: same bits, but the batch-1 decode step took +40 us with it on every
    # layer shape, the bucket-64 step -44 us (BENCHMARKS.md, twelfth session).
    ks = tl.arange(0, BLOCK_K)
    total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for split in range(first_split, last_split):
        k_lo = tl.multiple_of(split * SPLIT_LEN, 256)
        k_hi = tl.minimum(k_lo + SPLIT_LEN, K)
        x_tile = x_ptr + rows[None, :] * stride_xm + (k_lo + ks)[:, None]           # [BLOCK_K, BLOCK_M]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            w = w_desc.load([w_row0 + pid_n * BLOCK_N, k0])                          # [BLOCK_N, BLOCK_K]
            b = tl.load(x_tile, mask=(rows[None, :] < M) & (ks[:, None] < k_hi - k0), other=0.0)
            acc = tl.dot(w, b, acc)
            x_tile += BLOCK_K
        total += acc
    return tl.trans(total)


@triton.jit
def _range_dot(a_tile, a_index, a_limit, b_tile, b_index, b_limit, k_lo, k_hi, ks,
               BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, IS_FP32: tl.constexpr):
    # One K range's accumulator: a_tile [BLOCK_A, BLOCK_K] @ b_tile [BLOCK_K, BLOCK_B] pointers at the
    # range's first K block (rows a_index < a_limit, columns b_index < b_limit are real) -> [BLOCK_A,
    # BLOCK_B] fp32 from zero, BLOCK_K at a time in K order.
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_left = k_hi - k0
        a = tl.load(a_tile, mask=(a_index[:, None] < a_limit) & (ks[None, :] < k_left), other=0.0)
        b = tl.load(b_tile, mask=(b_index[None, :] < b_limit) & (ks[:, None] < k_left), other=0.0)
        if IS_FP32:  # float32 means float32 (Triton's default would round the inputs to tf32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_tile += BLOCK_K
        b_tile += BLOCK_K
    return acc


@triton.jit
def _last_to_finish(counter_ptr, NUM_SPLITS):
    # Ticket on this output tile's counter (scalar int32): True for the program that stores the
    # tile's last partial. The barrier puts every thread's partial stores before the release half
    # of the gpu-scope atomic (the CUTLASS split-K semaphore pattern); its acquire half, seen by the
    # whole program through the broadcast of the result, puts the other programs' stores before our
    # loads (which bypass L1: _sum_partials).
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return ticket == NUM_SPLITS - 1


@triton.jit
def _sum_partials(partial_ptr, rows, cols, mask, M, stride_pm, NUM_SPLITS,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # ((0 + partial[0]) + partial[1]) + ... for one [BLOCK_M, BLOCK_N] tile of partial [S, M, *]
    # fp32, exactly _sum_partials_kernel's adds. ".cg": read from L2, where the other programs'
    # (other SMs') stores landed; this SM's L1 is not coherent with them.
    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for split in range(0, NUM_SPLITS):
        partial = partial_ptr + (split * M + rows[:, None]) * stride_pm + cols[None, :]
        total += tl.load(partial, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _with_bias(total, bias_ptr, cols, N, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        total += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return total


@triton.jit
def _epilogue(total, total_up, bias_ptr, out_ptr, rows, cols, mask, N, stride_om,
              HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr):
    # out[rows, cols] = round(total + bias), the one rounding to the output dtype; SILU_MUL: both
    # halves rounded so (the gate_up output), then kernels/activation.py's arithmetic on them.
    value = _with_bias(total, bias_ptr, cols, N, HAS_BIAS).to(out_ptr.dtype.element_ty)
    if SILU_MUL:
        up = _with_bias(total_up, bias_ptr + N, cols, N, HAS_BIAS).to(out_ptr.dtype.element_ty)
        value = silu_mul(value, up)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], value, mask=mask)


@triton.jit(do_not_specialize=["M", "NUM_SPLITS"])
def _sum_partials_kernel(partial_ptr, bias_ptr, out_ptr, M, N, stride_om, NUM_SPLITS,
                         HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # The former second launch, kept as the oracle of the in-kernel sum (launch(two_launch=True):
    # tests, bench/check_determinism.py). out[m, n] = ((0 + partial[0, m, n]) + ...) (+ bias), rounded once.
    wait_previous_kernel(PDL)
    pid = tl.program_id(0)
    offsets = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)                      # [BLOCK] of M * N
    mask = offsets < M * N
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for split in range(0, NUM_SPLITS):
        total += tl.load(partial_ptr + split * M * N + offsets, mask=mask, other=0.0)
    cols = offsets % N
    if HAS_BIAS:
        total += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (offsets // N) * stride_om + cols, total.to(out_ptr.dtype.element_ty), mask=mask)


# Small-M steps (decode) run one program per (column tile, K range): enough programs to keep every
# SM streaming weights. The ranges are fixed by the weight's shape, so every M shares them.
_TARGET_PROGRAMS = 512
_MIN_K_BLOCKS_PER_SPLIT = 4
_SMALL_M = 64
_MID_M = 512


# Small-M tiles and K splits tuned per GPU model and weight shape by bench/tune_linear.py (CUDA
# graph replays at M = 1 and 64; every entry checked bit-equal to the large-M path on that GPU):
# {device name: {"N,K": {"tile": [BLOCK_N, BLOCK_K, num_warps, num_stages], "splits": [S, len],
#   "mid" / "large" (optional, M <= 512 / above): [BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages],
#   "mid_tma" / "large_tma" (optional, 16-bit inputs): the same for kernels/matmul_tma.py's TMA kernel,
#   "mid_tma_flat" / "large_tma_flat": true (optional: that TMA kernel as one pipelined loop over tiles and
#   K blocks, same bits),
#   "split_sum": "two_launch" (optional: small M adds its K ranges in a second launch),
#   "silu_tile": [BLOCK_N, BLOCK_K, num_warps, num_stages] or "unfused" (the fused gate_up + SiLU's
#   small-M tile, or the product then the activation),
#   "tile_tma": true (optional: the swapped small-M product's weight tiles come by TMA, same bits)}}}.
# Any BLOCK_K gives the same bits: the tensor-core dots accumulate 16-wide K slices in K order.
_TUNED_PATH = Path(__file__).with_name("linear_tiles.json")


@functools.lru_cache(maxsize=None)
def _tuned_for_device(device_name: str) -> dict:
    if not _TUNED_PATH.exists():
        return {}
    return json.loads(_TUNED_PATH.read_text()).get(device_name, {})


def tuned_entry(num_cols: int, k: int) -> dict | None:
    """The tuned entry for this weight shape on the current CUDA device, or None."""
    if not torch.cuda.is_available():
        return None
    return _tuned_for_device(torch.cuda.get_device_name()).get(f"{num_cols},{k}")


def k_split(num_cols: int, k: int) -> tuple[int, int]:
    """(num_splits, split_len) for a weight [num_cols, k]: a function of the shape (and GPU model)
    only. split_len is a multiple of 4 * BLOCK_K (so every tile config's BLOCK_K divides it)."""
    entry = tuned_entry(num_cols, k)
    if entry is not None:
        return tuple(entry["splits"])
    num_k_blocks = triton.cdiv(k, BLOCK_K)
    column_tiles = triton.cdiv(num_cols, tile_config(1, num_cols)[1])
    wanted = max(1, _TARGET_PROGRAMS // column_tiles)
    splits = max(1, min(wanted, num_k_blocks // _MIN_K_BLOCKS_PER_SPLIT))
    unit = _MIN_K_BLOCKS_PER_SPLIT
    per_split = triton.cdiv(triton.cdiv(num_k_blocks, splits), unit) * unit     # in BLOCK_K blocks
    return triton.cdiv(num_k_blocks, per_split), per_split * BLOCK_K


def tile_config(num_rows: int, num_cols: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for an [num_rows, num_cols] output. Small M
    (decode): narrow column tiles so the weight streams through many SMs; large M (prefill):
    128 x 256 tiles. Only the work split changes; each element's arithmetic does not."""
    if num_rows <= _SMALL_M:
        return 64, 32, 4, 6
    if num_rows <= _MID_M:
        return (64, 64, 4, 4) if num_cols <= 4096 else (128, 128, 8, 4)
    return 128, 256, 8, 3


# Shared memory the software pipeline may use (H100: 227 KiB per block; leave room for the epilogue).
_SHARED_MEMORY_BUDGET = 200 * 1024


def fit_num_stages(block_m: int, block_n: int, num_stages: int, element_size: int, block_k: int = BLOCK_K) -> int:
    """Fewer pipeline stages when the tiles are wider than bf16's (float32): stages only overlap
    loads with math, so the per-element arithmetic, and batch invariance, are unchanged."""
    per_stage = (block_m + block_n) * block_k * element_size
    return max(1, min(num_stages, _SHARED_MEMORY_BUDGET // per_stage))


def swap_rows(num_rows: int) -> int:
    """BLOCK_M of the swapped small-M product: x's rows are the dot's narrow side (16, 32 or 64)."""
    return max(16, triton.next_power_of_2(num_rows))


def plan(num_rows: int, num_cols: int, k: int, on_cuda: bool,
         config: tuple[int, int, int, int] | None = None) -> tuple[tuple[int, int, int, int, int], int, int]:
    """(tile, num_splits, split_len) for x [num_rows, k] @ weight [num_cols, k]^T: the tuned entry
    for the shape when there is one (CUDA, no explicit config), else tile_config / config."""
    num_splits, split_len = k_split(num_cols, k)
    entry = tuned_entry(num_cols, k) if on_cuda and config is None else None
    if entry is not None and num_rows <= _SMALL_M:
        block_n, block_k, num_warps, num_stages = entry["tile"]
        return (swap_rows(num_rows) if entry.get("swap_ab") else 64, block_n, block_k, num_warps, num_stages), \
            num_splits, split_len
    tuned_range = "mid" if num_rows <= _MID_M else "large"
    if entry is not None and tuned_range in entry:   # [BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages]
        return tuple(entry[tuned_range]), num_splits, split_len
    block_m, block_n, num_warps, num_stages = config or tile_config(num_rows, num_cols)
    return (block_m, block_n, BLOCK_K, num_warps, num_stages), num_splits, split_len


def _triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K], weight [N, K], bias [N] or None -> [M, N] in x.dtype."""
    entry = tuned_entry(weight.shape[0], x.shape[1]) if x.is_cuda and config is None else None
    tma_range = None if x.shape[0] <= _SMALL_M else ("mid_tma" if x.shape[0] <= _MID_M else "large_tma")
    if entry is not None and tma_range in entry and matmul_tma.supports(x, weight):
        num_splits, split_len = k_split(weight.shape[0], x.shape[1])
        return matmul_tma.launch(x, weight, bias, tuple(entry[tma_range]), num_splits, split_len,
                                 flat=bool(entry.get(f"{tma_range}_flat")))
    # Where the GPU's table says so (bench/fusion_ab.py timed both), small M sums its K ranges in a
    # second launch instead of inside the GEMM: the same additions in the same order.
    small = entry is not None and x.shape[0] <= _SMALL_M
    two_launch = small and entry.get("split_sum") == "two_launch"
    swap_ab = small and bool(entry.get("swap_ab"))
    return launch(x, weight, bias, *plan(x.shape[0], weight.shape[0], x.shape[1], x.is_cuda, config),
                  two_launch=two_launch, swap_ab=swap_ab, w_tma=swap_ab and uses_tile_tma(entry, x, weight))


def uses_tile_tma(entry: dict | None, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The GPU's table asks for TMA weight tiles in the swapped small-M product ("tile_tma") and the
    tensors allow them."""
    return entry is not None and bool(entry.get("tile_tma")) and matmul_tma.supports(x, weight)


def _triton_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K], weight [2I, K] = [gate; up], bias [2I] or None -> silu(x @ gate^T) * (x @ up^T): [M, I],
    the bits of silu_and_mul(_triton(x, weight, bias)) in one launch: the [2I, K] weight's K split,
    and its tile with half the columns per half (a program holds a gate and an up accumulator)."""
    entry = tuned_entry(weight.shape[0], x.shape[1]) if x.is_cuda else None
    silu_tile = entry.get("silu_tile") if entry is not None else None   # bench/fusion_ab.py's choice
    if x.shape[0] > _SMALL_M or silu_tile == "unfused":   # the product then the activation: same bits
        return _activation_triton(_triton(x, weight, bias))
    (block_m, block_n, block_k, num_warps, num_stages), num_splits, split_len = plan(
        x.shape[0], weight.shape[0], x.shape[1], x.is_cuda)
    # Swapped, a half's BLOCK_N is the tensor core's 64-row side: not halved (fewer rows would change
    # the instruction, and with it the bits); block_m is already x's narrow side (plan).
    swap_ab = entry is not None and bool(entry.get("swap_ab"))
    tile = (block_m, block_n if swap_ab else max(16, block_n // 2), block_k, num_warps, num_stages)
    if isinstance(silu_tile, list):   # [BLOCK_N per half, BLOCK_K, num_warps, num_stages]
        tile = (block_m, *silu_tile)
    return launch(x, weight, bias, tile, num_splits, split_len, silu_mul=True, swap_ab=swap_ab,
                  w_tma=swap_ab and uses_tile_tma(entry, x, weight))


def _reference_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _activation_reference(F.linear(x, weight, bias))


# Tile counters of the in-kernel split sum (kernels/ticket_counters.py); small M has <= 4 row tiles
# x N / 16 column tiles, so 65,536 (256 KiB) covers every LM shape without growing.
TILE_COUNTERS = TicketCounters("batch-invariant linear (split-K sums)", 1 << 16)


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           tile: tuple[int, int, int, int, int], num_splits: int, split_len: int,
           two_launch: bool = False, silu_mul: bool = False, swap_ab: bool = False,
           w_tma: bool = False) -> torch.Tensor:
    """One product with an explicit tile (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) and
    K split; bench/tune_linear.py sweeps these. -> [M, N] in x.dtype. two_launch: small M sums the
    K ranges in a second kernel (the former path, the oracle of tests and bench; same bits).
    silu_mul: weight (and bias) are [gate; up] with N = 2I rows -> silu(gate) * up: [M, I].
    swap_ab: the weight tile is the dot's wide operand (small M; see _range_sums), same bits.
    w_tma: with swap_ab, the weight tiles come by TMA (_range_sums_tma; 16-bit, aligned), same bits."""
    if silu_mul and (two_launch or weight.shape[0] % 2):
        raise ValueError("silu_mul needs an even number of weight rows ([gate; up]) and the in-kernel sum")
    out, partial = _launch_product(x, weight, bias, tile, num_splits, split_len, not two_launch, silu_mul, swap_ab,
                                   w_tma)
    if partial is not None:
        num_rows, num_cols = out.shape
        block = 1024
        _sum_partials_kernel[(triton.cdiv(num_rows * num_cols, block),)](
            partial, bias if bias is not None else weight, out, num_rows, num_cols, out.stride(0), num_splits,
            HAS_BIAS=bias is not None, BLOCK=block, PDL=(pdl := dependent_launch.enabled(x)), launch_pdl=pdl)
    return out


def launch_unsummed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    tile: tuple[int, int, int, int, int], num_splits: int, split_len: int,
                    swap_ab: bool = False, w_tma: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """launch's product with its K ranges left unsummed where small M has several: -> (out [M, N]
    unwritten, partial [S, M, N] fp32), for a second launch that adds them as _sum_partials_kernel
    does (kernels/linear_norm.py); otherwise (out [M, N] = the product, None)."""
    return _launch_product(x, weight, bias, tile, num_splits, split_len, False, False, swap_ab, w_tma)


def _launch_product(x, weight, bias, tile, num_splits, split_len, sum_in_kernel, silu_mul, swap_ab, w_tma=False):
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("x and weight must be contiguous in K")
    if w_tma and not (swap_ab and matmul_tma.supports(x, weight) and split_len % tile[2] == 0):
        raise ValueError("w_tma needs swap_ab, 16-bit aligned inputs and K ranges of whole BLOCK_K tiles")
    num_rows, num_cols = x.shape[0], weight.shape[0] // (2 if silu_mul else 1)
    out = x.new_empty((num_rows, num_cols))
    write_partial = num_splits > 1 and num_rows <= _SMALL_M
    if num_rows == 0:
        return out, None
    block_m, block_n, block_k, num_warps, num_stages = tile
    num_stages = fit_num_stages(block_m, block_n * (2 if silu_mul else 1), num_stages, x.element_size(), block_k)
    num_tiles = triton.cdiv(num_rows, block_m) * triton.cdiv(num_cols, block_n)
    partial = (torch.empty((num_splits, num_rows, weight.shape[0]), dtype=torch.float32, device=x.device)
               if write_partial else out)                                          # [S, M, N or 2I] fp32
    counters = TILE_COUNTERS.get(x.device, num_tiles) if write_partial and sum_in_kernel else partial
    pdl = dependent_launch.enabled(x)
    w_arg = TensorDescriptor.from_tensor(weight, [block_n, block_k]) if w_tma else weight
    _linear_kernel[(num_tiles, num_splits if write_partial else 1)](
        x, w_arg, bias if bias is not None else weight, out, partial, counters, num_rows, num_cols, x.shape[1],
        x.stride(0), weight.stride(0), out.stride(0), partial.stride(-2), split_len, num_splits,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
        IS_FP32=x.dtype == torch.float32, WRITE_PARTIAL=write_partial, SUM_IN_KERNEL=sum_in_kernel,
        SILU_MUL=silu_mul, SWAP_AB=swap_ab, PDL=pdl, W_TMA=w_tma, num_warps=num_warps, num_stages=num_stages,
        launch_pdl=pdl)
    return out, (partial if write_partial and not sum_in_kernel else None)
