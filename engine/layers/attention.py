"""Attention over the paged KV cache, and the batch metadata every attention layer receives.

Caller: the model's attention blocks (`forward(..., attn_metadata)`); the metadata is built once
per step by `engine.runner.input_batch` and passed down as an argument (no globals).

KV cache layout (one pair of tensors per layer):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
Token t of a request lives in block block_table[t // block_size] at offset t % block_size, i.e.
at flat slot = block_id * block_size + offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels


@dataclass
class AttentionMetadata:
    """One step's flattened ragged batch: request i owns query tokens
    [query_start_loc[i], query_start_loc[i+1]) and attends causally to the first seq_lens[i]
    positions of its sequence (the new tokens are its last q_len positions)."""

    query_start_loc: torch.Tensor   # [num_reqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor          # [num_reqs] int32, context + new tokens per request
    slot_mapping: torch.Tensor      # [num_tokens] int64, flat KV slot per new token; -1 = padding, skip
    block_tables: torch.Tensor      # [num_reqs, max_blocks_per_req] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    num_reqs: int
    num_actual_tokens: int          # tokens before CUDA-graph padding
    # Host copies used by the torch reference path (avoids device syncs on the GPU path).
    query_lens_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None


class AttentionBackend:
    """How an attention layer writes K/V into its cache and attends over it. One instance per
    runner; every layer shares it. This one goes through `kernels` (Triton on CUDA tensors, the
    torch reference elsewhere). Mutates: the slots of k_cache/v_cache named by slot_mapping."""

    name = "kernels"

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], attn_metadata: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """query [T, Hq, D], key/value [T, Hkv, D] -> [T, Hq, D]."""
        k_cache, v_cache = kv_cache  # each [num_blocks, block_size, Hkv, D]
        kernels.store_kv(key, value, k_cache, v_cache, attn_metadata.slot_mapping)
        return kernels.paged_attention(
            query, k_cache, v_cache, attn_metadata.query_start_loc, attn_metadata.seq_lens,
            attn_metadata.block_tables, scale, attn_metadata.max_query_len, attn_metadata.max_seq_len,
            query_lens_cpu=attn_metadata.query_lens_cpu, seq_lens_cpu=attn_metadata.seq_lens_cpu)


DEFAULT_BACKEND = AttentionBackend()


class Attention(torch.nn.Module):
    """Causal self-attention of one layer over the paged cache; holds no weights."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float | None = None,
                 backend: AttentionBackend | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.backend = backend or DEFAULT_BACKEND

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """query [T, Hq*D], key/value [T, Hkv*D] -> [T, Hq*D]."""
        num_tokens = query.shape[0]
        out = self.backend.forward(
            query.view(num_tokens, self.num_heads, self.head_dim),
            key.view(num_tokens, self.num_kv_heads, self.head_dim),
            value.view(num_tokens, self.num_kv_heads, self.head_dim),
            kv_cache, attn_metadata, self.scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
