"""Causal attention of a ragged batch of query tokens over the paged KV cache (prefill chunks and
decodes mixed in one launch), with grouped-query heads.

Caller: `kernels.paged_attention` (dispatch in `kernels/__init__.py`), from the engine's attention
layer after `store_kv` has written this step's K/V.

Request r owns query rows [query_start_loc[r], query_start_loc[r+1]); they are the LAST q_len
positions of its seq_len-token sequence, so query i sits at absolute position
context_len + i (context_len = seq_len - q_len) and sees keys 0..context_len + i.
Its token t lives in the cache at (block_tables[r, t // block_size], t % block_size):

    block_tables[r] = [7, 2, 9]     block_size = 4, seq_len = 10
    tokens 0-3 -> block 7, tokens 4-7 -> block 2, tokens 8-9 -> block 9 (offsets 0, 1)

Query head h reads KV head h // (num_q_heads // num_kv_heads), as HF's repeat_kv does.
The torch `_reference` is the CPU backend: float32 math, matmul + softmax like HF eager attention.
"""

from __future__ import annotations

import torch

# Query rows per matmul in the reference: bounds its score matrix to
# num_q_heads * _REFERENCE_QUERY_CHUNK * seq_len floats.
_REFERENCE_QUERY_CHUNK = 1024


def _reference(
    query: torch.Tensor,            # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor,          # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,          # [num_blocks, block_size, num_kv_heads, head_dim]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,         # [num_reqs] int32
    block_tables: torch.Tensor,     # [num_reqs, max_blocks_per_req] int32
    scale: float,
    out: torch.Tensor,              # [num_tokens, num_q_heads, head_dim], written in place
    query_lens_cpu: list[int] | None,
    seq_lens_cpu: list[int] | None,
) -> torch.Tensor:
    starts = query_start_loc.tolist()
    if query_lens_cpu is None:
        query_lens_cpu = [b - a for a, b in zip(starts[:-1], starts[1:])]
    if seq_lens_cpu is None:
        seq_lens_cpu = seq_lens.tolist()
    for r, (q_len, seq_len) in enumerate(zip(query_lens_cpu, seq_lens_cpu)):
        keys, values = _gather_sequence_kv(k_cache, v_cache, block_tables[r], seq_len)
        q = query[starts[r] : starts[r] + q_len]            # [q_len, num_q_heads, head_dim]
        out[starts[r] : starts[r] + q_len] = _attend_one_request(q, keys, values, scale).to(out.dtype)
    out[starts[-1] :] = 0
    return out


def _gather_sequence_kv(k_cache, v_cache, block_table, seq_len: int):
    block_size = k_cache.shape[1]
    block_ids = block_table[: -(-seq_len // block_size)].long()   # [num_seq_blocks]
    keys = k_cache[block_ids].flatten(0, 1)[:seq_len]              # [seq_len, num_kv_heads, head_dim]
    values = v_cache[block_ids].flatten(0, 1)[:seq_len]
    return keys, values


def _attend_one_request(
    q: torch.Tensor,       # [q_len, num_q_heads, head_dim]
    keys: torch.Tensor,    # [seq_len, num_kv_heads, head_dim]
    values: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    scale: float,
) -> torch.Tensor:         # [q_len, num_q_heads, head_dim] float32
    q_len, num_q_heads, head_dim = q.shape
    seq_len, num_kv_heads, _ = keys.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_q_heads // num_kv_heads
    # Fold the query heads sharing a KV head into the row dimension instead of repeating K/V.
    q = q.float().permute(1, 0, 2).reshape(num_kv_heads, group, q_len, head_dim)
    k = keys.float().permute(1, 2, 0)                      # [num_kv_heads, head_dim, seq_len]
    v = values.float().permute(1, 0, 2)                    # [num_kv_heads, seq_len, head_dim]
    context_len = seq_len - q_len
    key_pos = torch.arange(seq_len, device=q.device)
    out = torch.empty(num_kv_heads, group, q_len, head_dim, dtype=torch.float32, device=q.device)
    for lo in range(0, q_len, _REFERENCE_QUERY_CHUNK):
        hi = min(q_len, lo + _REFERENCE_QUERY_CHUNK)
        query_pos = torch.arange(context_len + lo, context_len + hi, device=q.device)
        is_future = key_pos[None, :] > query_pos[:, None]              # [hi - lo, seq_len]
        scores = torch.matmul(q[:, :, lo:hi], k[:, None]) * scale       # [kv, group, hi - lo, seq_len]
        scores = scores.masked_fill(is_future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[:, :, lo:hi] = torch.matmul(probs, v[:, None])
    return out.reshape(num_q_heads, q_len, head_dim).permute(1, 0, 2)
