"""RMSNorm and residual-add + RMSNorm with HF Qwen2RMSNorm rounding:
x32 = x.float(); y = (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype); out = weight * y.

Caller: `kernels.rms_norm` / `kernels.fused_add_rms_norm` (dispatch in `kernels/__init__.py`),
from the engine's norm layers. The residual add happens in the input dtype, as HF's decoder
layer does (`hidden = residual + hidden`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import vlserve_kernels.dependent_launch as dependent_launch
from vlserve_kernels.dependent_launch import wait_previous_kernel


def _reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()                                               # [num_tokens, hidden]
    variance = x32.pow(2).mean(-1, keepdim=True)                   # [num_tokens, 1]
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def _fused_add_reference(x, residual, weight, eps):
    new_residual = x + residual                                    # [num_tokens, hidden]
    return _reference(new_residual, weight, eps), new_residual


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, hidden, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    # One program per token row.
    wait_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    norm_row(x_ptr + row * stride_x, residual_ptr + row * stride_r, weight_ptr, out_ptr + row * stride_o,
             residual_out_ptr + row * stride_ro, hidden, eps, HAS_RESIDUAL, BLOCK)


@triton.jit
def norm_row(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, hidden, eps,
             HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One row (pointers at its first element): the add, the norm and their roundings. Shared with
    kernels/linear_norm.py, whose fused launch must give these bits (same code, same [BLOCK] layout:
    it too loads the row from memory in the input dtype, with num_warps 4)."""
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)   # add in input dtype
        tl.store(residual_out_ptr + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / hidden
    normed = (x32 * (1.0 / tl.sqrt(variance + eps))).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


NUM_WARPS = 4   # fixed: the row sum's layout (its order of additions) follows it


def _launch(x, residual, weight, eps):
    num_tokens, hidden = x.shape
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("x and weight must be contiguous in the hidden dimension")
    out = x.new_empty((num_tokens, hidden), dtype=torch.promote_types(weight.dtype, x.dtype))
    residual_out = torch.empty_like(x) if residual is not None else out
    residual_in = residual if residual is not None else x
    if num_tokens:
        _rms_norm_kernel[(num_tokens,)](
            x, residual_in, weight, out, residual_out, hidden, eps,
            x.stride(0), residual_in.stride(0), out.stride(0), residual_out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
            PDL=(pdl := dependent_launch.enabled(x)), launch_pdl=pdl, num_warps=NUM_WARPS)
    return out, residual_out


def _triton(x, weight, eps):
    return _launch(x, None, weight, eps)[0]


def _fused_add_triton(x, residual, weight, eps):
    return _launch(x, residual, weight, eps)
