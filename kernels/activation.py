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

from kernels.jit import LazyKernel


def _reference(x: torch.Tensor) -> torch.Tensor:   # x: [num_tokens, 2 * intermediate]
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up                        # [num_tokens, intermediate]
