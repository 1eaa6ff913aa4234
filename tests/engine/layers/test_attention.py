"""Attention built with a rotary_emb (rotary fused with the K/V-cache write) against its oracle,
the unfused path: RotaryEmbedding.forward, then an Attention without rotary. Same output, same
cache contents, bit for bit (CPU: the torch references)."""

import pytest
import torch

from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.rotary import RotaryEmbedding

BLOCK_SIZE, NUM_BLOCKS = 4, 8


def _metadata() -> AttentionMetadata:
    """Request 0 prefills 3 tokens (blocks 5, 2), request 1 decodes its 6th token (blocks 1, 7); the
    fifth row is CUDA-graph padding (slot -1)."""
    slots = [5 * BLOCK_SIZE, 5 * BLOCK_SIZE + 1, 5 * BLOCK_SIZE + 2, 7 * BLOCK_SIZE + 1, -1]
    return AttentionMetadata(
        query_start_loc=torch.tensor([0, 3, 4], dtype=torch.int32), seq_lens=torch.tensor([3, 6], dtype=torch.int32),
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([[5, 2], [1, 7]], dtype=torch.int32),
        max_query_len=3, max_seq_len=6, num_reqs=2, num_actual_tokens=4, query_lens_cpu=[3, 1], seq_lens_cpu=[3, 6])


def _inputs(num_heads, num_kv_heads, head_dim, mrope):
    gen = torch.Generator().manual_seed(num_heads * head_dim)
    widths = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    qkv = torch.randn(5, sum(widths), generator=gen)            # q, k, v: column slices, as the layers split
    positions = torch.tensor([0, 1, 2, 5, 0])
    if mrope:
        positions = torch.stack([positions, positions + torch.tensor([0, 1, 0, 2, 0]), positions * 2])  # [3, T]
    cache_shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    cache = torch.randn(cache_shape, generator=gen), torch.randn(cache_shape, generator=gen)  # request 1's past
    return qkv.split(widths, dim=-1), positions, cache


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,mrope_section,interleaved", [
    (4, 4, 16, None, False), (8, 2, 32, None, False), (8, 2, 32, [4, 6, 6], False), (4, 1, 64, [8, 12, 12], True)])
def test_fused_rotary_equals_rotary_then_attention(num_heads, num_kv_heads, head_dim, mrope_section, interleaved):
    (q, k, v), positions, (k_cache, v_cache) = _inputs(num_heads, num_kv_heads, head_dim, mrope_section is not None)
    rotary = RotaryEmbedding(head_dim, 64, 10000.0, mrope_section, mrope_interleaved=interleaved)
    fused = Attention(num_heads, head_dim, num_kv_heads, rotary_emb=rotary)
    unfused = Attention(num_heads, head_dim, num_kv_heads)
    caches = (k_cache.clone(), v_cache.clone())
    out = fused(q, k, v, _metadata(), caches, positions)                             # [T, Hq*D]

    expected_caches = (k_cache.clone(), v_cache.clone())
    q_rot, k_rot = rotary(positions, q.reshape(5, num_heads, head_dim), k.reshape(5, num_kv_heads, head_dim))
    expected = unfused(q_rot.reshape(5, -1), k_rot.reshape(5, -1), v, _metadata(), expected_caches)
    assert torch.equal(out, expected)
    assert torch.equal(caches[0], expected_caches[0]) and torch.equal(caches[1], expected_caches[1])
    # The oracle can tell: the cache holds the rotated key, not the key as it came in.
    assert not torch.equal(caches[0][5, 1], k.reshape(5, num_kv_heads, head_dim)[1])


def test_positions_exactly_when_built_with_a_rotary():
    (q, k, v), positions, caches = _inputs(4, 4, 16, False)
    with pytest.raises(ValueError, match="positions exactly"):
        Attention(4, 16, 4, rotary_emb=RotaryEmbedding(16, 64, 10000.0))(q, k, v, _metadata(), caches)
    with pytest.raises(ValueError, match="positions exactly"):
        Attention(4, 16, 4)(q, k, v, _metadata(), caches, positions)
    with pytest.raises(ValueError, match="rotary head_dim"):
        Attention(4, 16, 4, rotary_emb=RotaryEmbedding(32, 64, 10000.0))
