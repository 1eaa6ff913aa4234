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
