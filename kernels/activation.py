"""SwiGLU gate: silu(x[:, :I]) * x[:, I:], rounded like HF's `act_fn(gate(x)) * up(x)`
(silu result cast to the input dtype, then the product cast again).

Caller: `kernels.silu_and_mul` (dispatch in `kernels/__init__.py`), from the engine's MLP with a
merged gate_up projection; `silu_mul` also from kernels/matmul.py's fused gate_up + activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import vlserve_kernels.dependent_launch as dependent_launch
from vlserve_kernels.dependent_launch import wait_previous_kernel


def _reference(x: torch.Tensor) -> torch.Tensor:   # x: [num_tokens, 2 * intermediate]
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up                        # [num_tokens, intermediate]


@triton.jit
def silu_mul(gate, up):
    # gate, up: same-shape tensors in the model dtype -> silu(gate) * up in that dtype, rounded as
    # HF does. Shared with kernels/matmul.py's fused gate_up (batch_invariant_linear_silu_mul).
    gate = gate.to(tl.float32)
    activated = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)                   # HF rounds silu first
    return (activated.to(tl.float32) * up.to(tl.float32)).to(up.dtype)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, intermediate, stride_x, stride_o, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    # Program (token, column block).
    wait_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, silu_mul(gate, up), mask=mask)


def _triton(x: torch.Tensor) -> torch.Tensor:
    num_tokens, double_width = x.shape
    if double_width % 2 or x.stride(-1) != 1:
        raise ValueError("x must be [num_tokens, 2 * intermediate], contiguous in the last dimension")
    intermediate = double_width // 2
    out = x.new_empty((num_tokens, intermediate))
    block = min(1024, triton.next_power_of_2(intermediate))
    if num_tokens:
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(intermediate, block))](
            x, out, intermediate, x.stride(0), out.stride(0), BLOCK=block,
            PDL=(pdl := dependent_launch.enabled(x)), launch_pdl=pdl)
    return out
