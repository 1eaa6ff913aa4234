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

from kernels.jit import LazyKernel


def _reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()                                               # [num_tokens, hidden]
    variance = x32.pow(2).mean(-1, keepdim=True)                   # [num_tokens, 1]
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def _fused_add_reference(x, residual, weight, eps):
    new_residual = x + residual                                    # [num_tokens, hidden]
    return _reference(new_residual, weight, eps), new_residual
