"""Batch-invariant linear layer: out[M, N] = x[M, K] @ weight[N, K]^T (+ bias), where every row's
arithmetic is the same whatever M is (no split-K, no kernel choice by M).

Caller: `kernels.batch_invariant_linear` (dispatch in `kernels/__init__.py`), from the engine's
linear layers when DeviceConfig.deterministic is on (the default). cuBLAS picks its kernel (tile
shape, split-K, stream-K) by M, so a request's logits change with what else is in the batch;
here each output element is one fp32 accumulator fed by tl.dot over K in BLOCK_K steps, in K
order, then the bias is added and the sum rounded once. BLOCK_K and the instruction family
(tensor-core dot with >= 64 rows) are fixed; only BLOCK_N (and the grid) grow with M, which
changes which program computes an element, not how. bench/check_determinism.py checks the
row results bit for bit across M on the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_K = 64


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, IS_FP32: tl.constexpr,
):
    # Program -> (row tile, column tile), row tiles grouped by GROUP_M so weight tiles stay in L2.
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)                   # [BLOCK_M]
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)                   # [BLOCK_N]
    ks = tl.arange(0, BLOCK_K)
    x_tile = x_ptr + rows[:, None] * stride_xm + ks[None, :]                        # [BLOCK_M, BLOCK_K]
    w_tile = w_ptr + cols[None, :] * stride_wn + ks[:, None]                        # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_tile, mask=(rows[:, None] < M) & (ks[None, :] < k_left), other=0.0)
        b = tl.load(w_tile, mask=(cols[None, :] < N) & (ks[:, None] < k_left), other=0.0)
        if IS_FP32:  # float32 means float32 (Triton's default would round the inputs to tf32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_tile += BLOCK_K
        w_tile += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def tile_config(num_rows: int, num_cols: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for an [num_rows, num_cols] output. Small M
    (decode): narrow column tiles so the weight streams through many SMs; large M (prefill):
    128 x 256 tiles. Only the work split changes; each element's arithmetic does not."""
    if num_rows <= 64:
        return 64, 32, 4, 6
    if num_rows <= 512:
        return (64, 64, 4, 4) if num_cols <= 4096 else (128, 128, 8, 4)
    return 128, 256, 8, 3


# Shared memory the software pipeline may use (H100: 227 KiB per block; leave room for the epilogue).
_SHARED_MEMORY_BUDGET = 200 * 1024


def fit_num_stages(block_m: int, block_n: int, num_stages: int, element_size: int) -> int:
    """Fewer pipeline stages when the tiles are wider than bf16's (float32): stages only overlap
    loads with math, so the per-element arithmetic, and batch invariance, are unchanged."""
    per_stage = (block_m + block_n) * BLOCK_K * element_size
    return max(1, min(num_stages, _SHARED_MEMORY_BUDGET // per_stage))


def _triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [M, K], weight [N, K], bias [N] or None -> [M, N] in x.dtype."""
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("x and weight must be contiguous in K")
    num_rows, num_cols = x.shape[0], weight.shape[0]
    out = x.new_empty((num_rows, num_cols))
    if num_rows == 0:
        return out
    block_m, block_n, num_warps, num_stages = config or tile_config(num_rows, num_cols)
    num_stages = fit_num_stages(block_m, block_n, num_stages, x.element_size())
    grid = (triton.cdiv(num_rows, block_m) * triton.cdiv(num_cols, block_n),)
    _linear_kernel[grid](
        x, weight, bias if bias is not None else weight, out, num_rows, num_cols, x.shape[1],
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, GROUP_M=8,
        IS_FP32=x.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    return out
