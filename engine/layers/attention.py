"""Attention over the paged KV cache, and the batch metadata every attention layer receives.

Caller: the model's attention blocks (`forward(..., attn_metadata)`), which hand their rotary to
`Attention` so that it is fused with the K/V-cache write; the metadata is built once
per step by `engine.runner.input_batch` and passed down as an argument (no globals).

KV cache layout (one pair of tensors per layer):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
Token t of a request lives in block block_table[t // block_size] at offset t % block_size, i.e.
at flat slot = block_id * block_size + offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import vlserve_kernels as kernels
from engine.layers.rotary import RotaryEmbedding


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
        """query [T, Hq, D], key/value [T, Hkv, D] (already rotated, if at all) -> [T, Hq, D]."""
        k_cache, v_cache = kv_cache  # each [num_blocks, block_size, Hkv, D]
        kernels.store_kv(key, value, k_cache, v_cache, attn_metadata.slot_mapping)
        return self._attend(query, kv_cache, attn_metadata, scale)

    def forward_rotary(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       positions: torch.Tensor, rotary_emb: RotaryEmbedding,
                       kv_cache: tuple[torch.Tensor, torch.Tensor], attn_metadata: AttentionMetadata,
                       scale: float) -> torch.Tensor:
        """Unrotated query [T, Hq, D], key/value [T, Hkv, D], positions [T] or [3, T] -> [T, Hq, D].
        The rotary and the K/V write are one launch instead of two, and the rotated key never leaves
        it except into the cache; decode steps may run the attention in that launch too
        (kernels.rotary_store_kv_attention: per GPU model, the same bits either way)."""
        k_cache, v_cache = kv_cache  # each [num_blocks, block_size, Hkv, D]
        return kernels.rotary_store_kv_attention(
            query, key, value, positions, rotary_emb.cos_sin_cache, k_cache, v_cache, attn_metadata.slot_mapping,
            attn_metadata.query_start_loc, attn_metadata.seq_lens, attn_metadata.block_tables, scale,
            attn_metadata.max_query_len, attn_metadata.max_seq_len, rotary_emb.section(positions),
            rotary_emb.mrope_interleaved, attn_metadata.query_lens_cpu, attn_metadata.seq_lens_cpu)

    def _attend(self, query: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        return kernels.paged_attention(
            query, k_cache, v_cache, attn_metadata.query_start_loc, attn_metadata.seq_lens,
            attn_metadata.block_tables, scale, attn_metadata.max_query_len, attn_metadata.max_seq_len,
            query_lens_cpu=attn_metadata.query_lens_cpu, seq_lens_cpu=attn_metadata.seq_lens_cpu)


DEFAULT_BACKEND = AttentionBackend()


class Attention(torch.nn.Module):
    """Causal self-attention of one layer over the paged cache; holds no weights. Given a
    `rotary_emb`, it takes query and key unrotated plus `positions` and applies the rotary itself,
    fused with the K/V-cache write (AttentionBackend.forward_rotary); without one, query and key
    come as they are to be cached."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float | None = None,
                 backend: AttentionBackend | None = None, rotary_emb: RotaryEmbedding | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
        if rotary_emb is not None and rotary_emb.head_dim != head_dim:
            raise ValueError(f"rotary head_dim {rotary_emb.head_dim} != attention head_dim {head_dim}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.backend = backend or DEFAULT_BACKEND
        self.rotary_emb = rotary_emb

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_metadata: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor],
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """query [T, Hq*D], key/value [T, Hkv*D]; positions [T] or [3, T], exactly when this layer
        has a rotary_emb -> [T, Hq*D]."""
        if (positions is None) != (self.rotary_emb is None):
            raise ValueError("Attention takes positions exactly when it was built with a rotary_emb")
        num_tokens = query.shape[0]
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.rotary_emb is None or positions is None:
            out = self.backend.forward(query, key, value, kv_cache, attn_metadata, self.scale)
        else:
            out = self.backend.forward_rotary(query, key, value, positions, self.rotary_emb, kv_cache,
                                              attn_metadata, self.scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
