"""Non-causal variable-length self-attention for the vision towers.

Caller: the attention blocks of `vision.towers.*`. The tokens of several images / frames /
windows are packed along dim 0; segment s owns rows [cu_seqlens[s], cu_seqlens[s+1]) and attends
to exactly those rows (bidirectionally). Nothing crosses a segment boundary.

    q/k/v rows:  | img0 frame0 | img0 frame1 | img1 | ...
    cu_seqlens:  0             64            128    228

Backend, chosen once at import by `_pick_cuda_backend()`:
  * CUDA tensors in fp16/bf16: `flash_attn.flash_attn_varlen_func` when the flash-attn package
    imports; else torch's own varlen flash kernel (`torch.nn.attention.varlen.varlen_attn`, or the
    `aten._flash_attention_forward` op it wraps on torchs without that module); else SDPA below.
  * Everything else (CPU, fp32 on CUDA): `_grouped_sdpa`. Segments of equal length are stacked
    into one [num_segments, heads, length, head_dim] batch and run by one
    `F.scaled_dot_product_attention` call. That is exact (no mask, no padding) and needs one call
    per distinct length: windows of Qwen2.5-VL are mostly full (same length) and the frames of a
    video all have the same length, so a step usually makes only a handful of calls. A
    block-diagonal mask would cost num_tokens^2 work instead of sum(length^2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

_FLASH_DTYPES = (torch.float16, torch.bfloat16)

# varlen kernel signature: (q, k, v, cu_seqlens, max_seqlen, scale) -> out [N, H, D]
VarlenKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


def varlen_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    cu_seqlens: torch.Tensor,  # [num_segments + 1] int32, on q's device
    max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Softmax(q k^T * scale) v within each segment; scale defaults to head_dim ** -0.5."""
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [N, H, D] shape, got {q.shape}, {k.shape}, {v.shape}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.is_cuda and q.dtype in _FLASH_DTYPES and _CUDA_KERNEL is not None:
        return _CUDA_KERNEL(q, k, v, cu_seqlens.to(torch.int32), max_seqlen, scale)
    return _grouped_sdpa(q, k, v, cu_seqlens, scale)


def backend_name(device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend `varlen_attention` uses for tensors of this device and dtype (for logs)."""
    if torch.device(device).type == "cuda" and dtype in _FLASH_DTYPES and _CUDA_KERNEL is not None:
        return _CUDA_KERNEL.__name__
    return _grouped_sdpa.__name__


def _grouped_sdpa(q, k, v, cu_seqlens, scale: float) -> torch.Tensor:
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to num_tokens={q.shape[0]}, got {bounds[0]}..{bounds[-1]}")
    starts_by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end < start:
            raise ValueError(f"cu_seqlens must be non-decreasing, got {start} then {end}")
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)
    out = torch.empty_like(q)  # [N, H, D]; every row belongs to one segment (checked above)
    for length, starts in starts_by_length.items():
        rows = torch.tensor(starts)[:, None] + torch.arange(length)  # [num_segments, length]
        rows = rows.to(q.device)
        # [num_segments, length, H, D] -> [num_segments, H, length, D]
        q_seg, k_seg, v_seg = (t[rows].transpose(1, 2) for t in (q, k, v))
        o_seg = F.scaled_dot_product_attention(q_seg, k_seg, v_seg, scale=scale)
        out[rows] = o_seg.transpose(1, 2)
    return out


def _flash_attn_kernel(q, k, v, cu_seqlens, max_seqlen: int, scale: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=False
    )


def _torch_varlen_kernel(q, k, v, cu_seqlens, max_seqlen: int, scale: float) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)


def _aten_flash_kernel(q, k, v, cu_seqlens, max_seqlen: int, scale: float) -> torch.Tensor:
    out = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, False, False, scale=scale
    )
    return out[0]


def _pick_cuda_backend() -> VarlenKernel | None:
    """flash-attn > aten flash op > torch varlen_attn > None (= SDPA), by what imports here."""
    try:
        import flash_attn  # noqa: F401

        return _flash_attn_kernel
    except (ImportError, OSError):  # absent, or built against another torch/CUDA
        pass
    # The aten op before torch's public varlen_attn: that one is a custom op whose first call imports
    # torch._dynamo (~5 s of a cold engine start on the H200, measured with py-spy) and whose autograd
    # wrapper costs Python on every call of the eager tower; both run the same flash kernel.
    if hasattr(torch.ops.aten, "_flash_attention_forward"):
        return _aten_flash_kernel
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        return _torch_varlen_kernel
    except ImportError:
        return None


_CUDA_KERNEL: VarlenKernel | None = _pick_cuda_backend()
