"""SwiGLU gate: silu(x[:, :I]) * x[:, I:], rounded like HF's `act_fn(gate(x)) * up(x)`
(silu result cast to the input dtype, then the product cast again).

Caller: `kernels.silu_and_mul` (dispatch in `kernels/__init__.py`), from the engine's MLP with a
merged gate_up projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def _reference(x: torch.Tensor) -> torch.Tensor:   # x: [num_tokens, 2 * intermediate]
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up                        # [num_tokens, intermediate]


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, intermediate, stride_x, stride_o, BLOCK: tl.constexpr):
    # Program (token, column block).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    activated = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty)     # HF rounds silu first
    out = activated.to(tl.float32) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _triton(x: torch.Tensor) -> torch.Tensor:
    num_tokens, double_width = x.shape
    if double_width % 2 or x.stride(-1) != 1:
        raise ValueError("x must be [num_tokens, 2 * intermediate], contiguous in the last dimension")
    intermediate = double_width // 2
    out = x.new_empty((num_tokens, intermediate))
    block = min(1024, triton.next_power_of_2(intermediate))
    if num_tokens:
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(intermediate, block))](
            x, out, intermediate, x.stride(0), out.stride(0), BLOCK=block)
    return out
