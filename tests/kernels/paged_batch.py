"""Builders for paged-attention tests: a random ragged batch in a shuffled paged cache, and a
hand-written dense causal attention oracle. Imported by test_paged_attention.py and by
interpreted/paged_attention_cases.py."""

from __future__ import annotations

import math
import random

import torch

# (query_lens, seq_lens): decodes, a full prefill, chunked prefills whose context is longer than
# the chunk, lengths that are not multiples of the block sizes.
MIXED = ([1, 5, 1, 3], [9, 5, 23, 20])
ATTENTION_ARGS = ("query", "k_cache", "v_cache", "query_start_loc", "seq_lens", "block_tables", "scale",
                  "max_query_len", "max_seq_len")


def make_batch(query_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size,
               dtype=torch.float32, shared_prefix_blocks=0, num_padding_tokens=0, seed=0):
    """Random K/V written into shuffled (non-contiguous) cache blocks. With shared_prefix_blocks = n,
    request 1's first n table entries point at request 0's blocks (prefix sharing)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 3
    free_block_ids = list(range(num_blocks))
    random.Random(seed).shuffle(free_block_ids)
    tables = [[free_block_ids.pop() for _ in range(n)] for n in blocks_per_req]
    if shared_prefix_blocks:
        tables[1][:shared_prefix_blocks] = tables[0][:shared_prefix_blocks]
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_req) + 1, dtype=torch.int32)
    for r, table in enumerate(tables):
        block_tables[r, : len(table)] = torch.tensor(table, dtype=torch.int32)
    num_tokens = sum(query_lens) + num_padding_tokens
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    return dict(
        query=torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(dtype),
        k_cache=torch.randn(cache_shape, generator=gen).to(dtype),
        v_cache=torch.randn(cache_shape, generator=gen).to(dtype),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=block_tables,
        scale=1.0 / math.sqrt(head_dim), max_query_len=max(query_lens), max_seq_len=max(seq_lens))


def dense_causal_attention(batch) -> torch.Tensor:
    """Oracle in float64: for each request, query token and head, softmax over the keys at positions
    <= the query's, reading the sequence token by token through the block table."""
    query, k_cache, v_cache = batch["query"].double(), batch["k_cache"].double(), batch["v_cache"].double()
    block_size, group = k_cache.shape[1], query.shape[1] // k_cache.shape[2]
    expected = torch.zeros_like(query)
    starts = batch["query_start_loc"].tolist()
    for r, seq_len in enumerate(batch["seq_lens"].tolist()):
        table = batch["block_tables"][r].tolist()
        keys = torch.stack([k_cache[table[t // block_size], t % block_size] for t in range(seq_len)])
        values = torch.stack([v_cache[table[t // block_size], t % block_size] for t in range(seq_len)])
        q_len = starts[r + 1] - starts[r]
        for i in range(q_len):
            position = seq_len - q_len + i
            for h in range(query.shape[1]):
                scores = keys[: position + 1, h // group] @ query[starts[r] + i, h] * batch["scale"]
                expected[starts[r] + i, h] = torch.softmax(scores, 0) @ values[: position + 1, h // group]
    return expected


def decode_batch(batch, requests, num_padding_requests=0, max_seq_len=None):
    """Pure-decode batch of `batch`'s single-token requests `requests` (in that order, same caches),
    then num_padding_requests padding requests as the decode graphs make them (seq_len 1 over block 0,
    zero query). max_seq_len: the launch's bound (graphs pass one larger than any sequence)."""
    starts = batch["query_start_loc"].tolist()
    if any(starts[r + 1] - starts[r] != 1 for r in requests):
        raise ValueError(f"requests {requests} are not all single-token decodes")
    num_reqs = len(requests) + num_padding_requests
    query = batch["query"].new_zeros(num_reqs, *batch["query"].shape[1:])
    query[: len(requests)] = batch["query"][[starts[r] for r in requests]]
    seq_lens = torch.ones(num_reqs, dtype=torch.int32)
    seq_lens[: len(requests)] = batch["seq_lens"][requests]
    block_tables = batch["block_tables"].new_zeros(num_reqs, batch["block_tables"].shape[1])
    block_tables[: len(requests)] = batch["block_tables"][requests]
    return dict(batch, query=query, query_start_loc=torch.arange(num_reqs + 1, dtype=torch.int32),
                seq_lens=seq_lens, block_tables=block_tables, max_query_len=1,
                max_seq_len=max_seq_len or int(seq_lens.max()))
