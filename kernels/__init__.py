"""Public kernel entry points: plain tensors in, plain tensors out.

Caller: the engine's layers (attention, rotary, norm, activation), its sampler (grammar masks) and the
vision towers.
Dispatch: the Triton kernel when the tensors are on CUDA; the torch `_reference` of the same
kernel file otherwise (that reference is the CPU backend). CPU tests run the Triton kernels in
the interpreter: TRITON_INTERPRET=1 must be set before triton is first imported (triton.jit reads it
when decorating), plus VLSERVE_FORCE_TRITON=1 (read at each call) to route CPU tensors to Triton.
"""

from __future__ import annotations

import os

import torch

from vlserve_kernels import activation as _activation
from vlserve_kernels import grammar_mask as _grammar_mask
from vlserve_kernels import linear_norm as _linear_norm
from vlserve_kernels import matmul as _matmul
from vlserve_kernels import paged_attention as _paged_attention
from vlserve_kernels import rmsnorm as _rmsnorm
from vlserve_kernels import rotary as _rotary
from vlserve_kernels import store_kv as _store_kv

__all__ = [
    "apply_rotary", "apply_token_bitmask_inplace", "batch_invariant_linear", "batch_invariant_linear_add_rms_norm",
    "batch_invariant_linear_silu_mul",
    "fused_add_rms_norm", "paged_attention", "rms_norm", "rotary_store_kv", "silu_and_mul", "store_kv",
    "uses_triton",
]


def uses_triton(tensor: torch.Tensor) -> bool:
    """True when a call on `tensor` runs the Triton kernel rather than the torch reference."""
    if tensor.is_cuda:
        return True
    return (os.environ.get("VLSERVE_FORCE_TRITON", "0") == "1"
            and os.environ.get("TRITON_INTERPRET", "0") == "1")


def store_kv(
    key: torch.Tensor,           # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,         # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,       # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,       # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 = padding, skipped
) -> None:
    impl = _store_kv._triton if uses_triton(key) else _store_kv._reference
    impl(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,            # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,          # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,          # [num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,         # [num_reqs] int32
    block_tables: torch.Tensor,     # [num_reqs, max_blocks_per_req] int32
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    out: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_dim]
    query_lens_cpu: list[int] | None = None,
    seq_lens_cpu: list[int] | None = None,
) -> torch.Tensor:                  # [num_tokens, num_q_heads, head_dim]; rows past the batch are 0
    """Causal GQA attention; request r's queries are the last q_len of its seq_lens[r] positions.
    query_start_loc and seq_lens must not be written by the launch just before this one (on the GPU
    they are read before the wait for it; kernels/dependent_launch.py)."""
    if query.shape[1] % k_cache.shape[2]:
        raise ValueError(f"num_q_heads {query.shape[1]} is not a multiple of num_kv_heads {k_cache.shape[2]}")
    if out is None:
        out = torch.empty_like(query)
    if uses_triton(query):
        return _paged_attention._triton(
            query, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
            max_query_len, max_seq_len, out, query_lens_cpu)
    return _paged_attention._reference(
        query, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, out,
        query_lens_cpu, seq_lens_cpu)


def rotary_store_kv_attention(
    query: torch.Tensor,            # [num_tokens, num_q_heads, head_dim], unrotated
    key: torch.Tensor,              # [num_tokens, num_kv_heads, head_dim], unrotated
    value: torch.Tensor,            # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,        # [num_tokens] or [3, num_tokens] int64
    cos_sin_cache: torch.Tensor,    # [max_position, head_dim]
    k_cache: torch.Tensor,          # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,          # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,     # [num_tokens] int64; -1 = padding, skipped
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,         # [num_reqs] int32
    block_tables: torch.Tensor,     # [num_reqs, max_blocks_per_req] int32
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    mrope_section: list[int] | None = None,
    mrope_interleaved: bool = False,
    query_lens_cpu: list[int] | None = None,
    seq_lens_cpu: list[int] | None = None,
) -> torch.Tensor:                  # [num_tokens, num_q_heads, head_dim]; rows past the batch are 0
    """rotary_store_kv then paged_attention, with the same bits. On a GPU whose attention launch has
    fuse_rotary (kernels/attention_launch.json), split decode launches (max_query_len 1, few sequences,
    one program per KV segment) do both in one launch: each program rotates its own token's query heads,
    and the one walking the token's segment writes its rotated key and value into the cache before
    reading them."""
    launch = _paged_attention.launch_for(query.device)
    num_reqs, num_kv_heads = query_start_loc.shape[0] - 1, k_cache.shape[2]
    if (uses_triton(query) and launch.fuse_rotary
            and _paged_attention.is_split_launch(launch, max_query_len, max_seq_len, num_reqs, num_kv_heads)):
        # The checks rotary_store_kv and paged_attention make on the other path.
        if (positions.dim() == 2) != (mrope_section is not None):
            raise ValueError("positions must be [3, num_tokens] exactly when mrope_section is given")
        if query.shape[1] % k_cache.shape[2]:
            raise ValueError(f"num_q_heads {query.shape[1]} is not a multiple of num_kv_heads {k_cache.shape[2]}")
        rotary = _paged_attention.DecodeRotary(key, value, positions, cos_sin_cache, slot_mapping, mrope_section,
                                               mrope_interleaved)
        return _paged_attention._triton(query, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                                        max_query_len, max_seq_len, torch.empty_like(query), query_lens_cpu,
                                        rotary=rotary)
    rotated = rotary_store_kv(query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                              mrope_section, mrope_interleaved)
    return paged_attention(rotated, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, max_query_len,
                           max_seq_len, query_lens_cpu=query_lens_cpu, seq_lens_cpu=seq_lens_cpu)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [num_tokens, hidden], weight: [hidden] -> [num_tokens, hidden] (HF Qwen2RMSNorm)."""
    if uses_triton(x):
        return _rmsnorm._triton(x, weight, eps)
    return _rmsnorm._reference(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [num_tokens, hidden] -> (rms_norm(x + residual), x + residual)."""
    if uses_triton(x):
        return _rmsnorm._fused_add_triton(x, residual, weight, eps)
    return _rmsnorm._fused_add_reference(x, residual, weight, eps)


def apply_rotary(
    query: torch.Tensor,          # [num_tokens, num_q_heads, head_dim]
    key: torch.Tensor,            # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,      # [num_tokens] or [3, num_tokens] int64
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim]: cos | sin of the head_dim/2 frequencies
    mrope_section: list[int] | None = None,
    mrope_interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style RoPE (HF rotate_half); M-RoPE when mrope_section is given, with the frequencies
    interleaved over t/h/w (Qwen3-VL) when mrope_interleaved. Returns new tensors."""
    if (positions.dim() == 2) != (mrope_section is not None):
        raise ValueError("positions must be [3, num_tokens] exactly when mrope_section is given")
    if uses_triton(query):
        return _rotary._triton(query, key, positions, cos_sin_cache, mrope_section, mrope_interleaved)
    return _rotary._reference(query, key, positions, cos_sin_cache, mrope_section, mrope_interleaved)


def rotary_store_kv(
    query: torch.Tensor,          # [num_tokens, num_q_heads, head_dim], unrotated
    key: torch.Tensor,            # [num_tokens, num_kv_heads, head_dim], unrotated
    value: torch.Tensor,          # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,      # [num_tokens] or [3, num_tokens] int64
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim]: cos | sin of the head_dim/2 frequencies
    k_cache: torch.Tensor,        # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,        # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,   # [num_tokens] int64; -1 = padding, skipped
    mrope_section: list[int] | None = None,
    mrope_interleaved: bool = False,
) -> torch.Tensor:                # [num_tokens, num_q_heads, head_dim], the rotated query (new tensor)
    """apply_rotary then store_kv of the rotated key and value, in one launch (the cache gets the
    same bits as the two calls); the rotated key is not returned (attention reads it from the cache).
    positions, cos_sin_cache and slot_mapping must not be written by the launch just before this one
    (on the GPU they are read before the wait for it; kernels/dependent_launch.py)."""
    if (positions.dim() == 2) != (mrope_section is not None):
        raise ValueError("positions must be [3, num_tokens] exactly when mrope_section is given")
    impl = _rotary._rotary_store_kv_triton if uses_triton(query) else _rotary._rotary_store_kv_reference
    return impl(query, key, value, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                mrope_section, mrope_interleaved)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * intermediate] -> silu(x[:, :I]) * x[:, I:]: [num_tokens, intermediate]."""
    if uses_triton(x):
        return _activation._triton(x)
    return _activation._reference(x)


def batch_invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [num_tokens, in], weight: [out, in], bias: [out] -> [num_tokens, out]; each row's result is
    independent of num_tokens (split-K fixed by the weight shape, no kernel choice by batch size). CPU: F.linear."""
    if uses_triton(x):
        return _matmul._triton(x, weight, bias)
    return _matmul._reference(x, weight, bias)


def batch_invariant_linear_silu_mul(x: torch.Tensor, weight_gate_up: torch.Tensor,
                                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [num_tokens, in], weight_gate_up: [2 * I, in] = [gate; up], bias: [2 * I] -> [num_tokens, I]:
    silu_and_mul(batch_invariant_linear(x, weight_gate_up, bias)) bit for bit, in one launch (no
    [num_tokens, 2 * I] intermediate). CPU: F.linear, then silu_and_mul's reference."""
    if uses_triton(x):
        return _matmul._triton_silu_mul(x, weight_gate_up, bias)
    return _matmul._reference_silu_mul(x, weight_gate_up, bias)


def batch_invariant_linear_add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
    norm_weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [num_tokens, in], weight: [out, in], residual: [num_tokens, out] -> fused_add_rms_norm(
    batch_invariant_linear(x, weight, bias), residual, norm_weight, eps) bit for bit: (normed,
    new residual), in fewer launches at small M (kernels/linear_norm.py). CPU: the references."""
    if uses_triton(x):
        return _linear_norm._triton(x, weight, bias, residual, norm_weight, eps)
    return _linear_norm._reference(x, weight, bias, residual, norm_weight, eps)


def apply_token_bitmask_inplace(
    logits: torch.Tensor,   # [num_rows, vocab] float, modified in place
    rows: torch.Tensor,     # [num_masked] int64, distinct rows of logits
    bitmask: torch.Tensor,  # [num_masked, ceil(vocab / 32)] int32; bit set = allowed (kernels/grammar_mask.py)
) -> None:
    """Structured outputs: logits[rows[c], t] = -inf for every token t that bitmask[c] forbids."""
    if uses_triton(logits):
        _grammar_mask._triton(logits, rows, bitmask)
    else:
        _grammar_mask._reference(logits, rows, bitmask)
