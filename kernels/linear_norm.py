"""Batch-invariant linear, then the residual add and RMSNorm that follow it (the attention output
projection and post_attention_layernorm): out = x @ W^T (+ b); residual' = out + residual;
normed = rms_norm(residual') -> (normed, residual').

Caller: `kernels.batch_invariant_linear_add_rms_norm` (dispatch in `kernels/__init__.py`), from
engine.layers.norm.RMSNorm.of_projection in deterministic mode.

Where a small-M product sums its K ranges in a second launch (the GPU's table says "two_launch",
kernels/matmul.py), that launch also adds the residual and normalises: one launch instead of two
per layer. Same bits as the product then kernels/rmsnorm.py: the K-range sum is _sum_partials_kernel's
(ranges in order, then the bias, one rounding), the product row is written and read back in the
input dtype, and the norm is rmsnorm's own code (norm_row: same [BLOCK] layout, same num_warps).
Every other case runs the two kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import vlserve_kernels.dependent_launch as dependent_launch
import vlserve_kernels.matmul as matmul
import vlserve_kernels.rmsnorm as rmsnorm
from vlserve_kernels.dependent_launch import wait_previous_kernel
from vlserve_kernels.rmsnorm import norm_row


def _reference(x, weight, bias, residual, norm_weight, eps):
    return rmsnorm._fused_add_reference(matmul._reference(x, weight, bias), residual, norm_weight, eps)


@triton.jit(do_not_specialize=["M", "NUM_SPLITS"])
def _sum_add_norm_kernel(partial_ptr, bias_ptr, residual_ptr, weight_ptr, product_ptr, out_ptr, residual_out_ptr,
                         M, N, eps, stride_p, stride_r, stride_o, stride_ro, NUM_SPLITS,
                         HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # One program per row m: product[m] = round(((0 + partial[0, m]) + ...) + bias), then norm_row.
    wait_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for split in range(0, NUM_SPLITS):
        total += tl.load(partial_ptr + (split * M + row) * N + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(product_ptr + row * stride_p + cols, total.to(product_ptr.dtype.element_ty), mask=mask)
    # Every thread's store before any thread's load: norm_row reads the row back as rmsnorm does.
    tl.debug_barrier()
    norm_row(product_ptr + row * stride_p, residual_ptr + row * stride_r, weight_ptr, out_ptr + row * stride_o,
             residual_out_ptr + row * stride_ro, N, eps, True, BLOCK)


def launch(x, weight, bias, residual, norm_weight, eps, tile, num_splits, split_len, swap_ab=False, w_tma=False):
    """The fused path with an explicit tile and K split (kernels/matmul.launch's arguments)."""
    product, partial = matmul.launch_unsummed(x, weight, bias, tile, num_splits, split_len, swap_ab=swap_ab,
                                              w_tma=w_tma)
    if partial is None:
        return rmsnorm._fused_add_triton(product, residual, norm_weight, eps)
    num_rows, hidden = product.shape
    if residual.shape != product.shape or residual.stride(-1) != 1:
        raise ValueError(f"residual {tuple(residual.shape)} must be a [M, N] = {tuple(product.shape)} row-major tensor")
    out = product.new_empty((num_rows, hidden), dtype=torch.promote_types(norm_weight.dtype, product.dtype))
    residual_out = torch.empty_like(product)
    _sum_add_norm_kernel[(num_rows,)](
        partial, bias if bias is not None else norm_weight, residual, norm_weight, product, out, residual_out,
        num_rows, hidden, eps, product.stride(0), residual.stride(0), out.stride(0), residual_out.stride(0),
        num_splits, HAS_BIAS=bias is not None, BLOCK=triton.next_power_of_2(hidden),
        PDL=(pdl := dependent_launch.enabled(x)), launch_pdl=pdl, num_warps=rmsnorm.NUM_WARPS)
    return out, residual_out


def _triton(x, weight, bias, residual, norm_weight, eps):
    entry = matmul.tuned_entry(weight.shape[0], x.shape[1]) if x.is_cuda else None
    fused = (entry is not None and x.shape[0] <= matmul._SMALL_M and entry.get("split_sum") == "two_launch")
    if not fused:
        return rmsnorm._fused_add_triton(matmul._triton(x, weight, bias), residual, norm_weight, eps)
    tile, num_splits, split_len = matmul.plan(x.shape[0], weight.shape[0], x.shape[1], True)
    swap_ab = bool(entry.get("swap_ab"))
    return launch(x, weight, bias, residual, norm_weight, eps, tile, num_splits, split_len, swap_ab=swap_ab,
                  w_tma=swap_ab and matmul.uses_tile_tma(entry, x, weight))
