"""vision.attention.varlen_attention against a naive float64 softmax(q k^T) v per segment."""

from __future__ import annotations

import pytest
import torch

from vision import attention
from vision.attention import varlen_attention


def _naive(q, k, v, lengths: list[int], scale: float) -> torch.Tensor:
    out = torch.zeros_like(q, dtype=torch.float64)
    start = 0
    for length in lengths:
        rows = slice(start, start + length)
        q_s, k_s, v_s = (t[rows].double().transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        weights = torch.softmax(q_s @ k_s.transpose(1, 2) * scale, dim=-1)
        out[rows] = (weights @ v_s).transpose(0, 1)
        start += length
    return out


def _packed(lengths: list[int], num_heads: int, head_dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    num_tokens = sum(lengths)
    q, k, v = (2.0 * torch.randn(num_tokens, num_heads, head_dim, generator=generator) for _ in range(3))
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    return q, k, v, cu_seqlens


@pytest.mark.parametrize(
    "lengths, num_heads, head_dim",
    [
        ([16, 16, 16, 8, 16, 4], 2, 8),  # windows: many equal lengths, some short ones
        ([1, 37, 5, 37, 1], 3, 16),  # single-token segments, repeated odd lengths
        ([64], 1, 4),  # one segment
        ([7, 0, 9], 4, 12),  # an empty segment
    ],
)
def test_matches_naive_reference(lengths, num_heads, head_dim):
    q, k, v, cu_seqlens = _packed(lengths, num_heads, head_dim, seed=len(lengths))
    out = varlen_attention(q, k, v, cu_seqlens, max(lengths))
    torch.testing.assert_close(out.double(), _naive(q, k, v, lengths, head_dim**-0.5), rtol=1e-5, atol=1e-5)


def test_explicit_scale_and_no_leak_across_segments():
    lengths = [5, 5]
    q, k, v, cu_seqlens = _packed(lengths, 2, 8, seed=3)
    out = varlen_attention(q, k, v, cu_seqlens, 5, scale=0.7)
    torch.testing.assert_close(out.double(), _naive(q, k, v, lengths, 0.7), rtol=1e-5, atol=1e-5)
    v_changed = v.clone()
    v_changed[5:] += 10.0  # the second segment's values must not reach the first segment
    out_changed = varlen_attention(q, k, v_changed, cu_seqlens, 5, scale=0.7)
    assert torch.equal(out_changed[:5], out[:5])
    assert not torch.allclose(out_changed[5:], out[5:])


def test_rejects_bad_segments():
    q, k, v, _ = _packed([4, 4], 1, 4, seed=0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, k, v, torch.tensor([0, 4, 6], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_attention(q, k, v, torch.tensor([0, 6, 4, 8], dtype=torch.int32), 6)
    with pytest.raises(ValueError, match="shape"):
        varlen_attention(q, k[:, :, :2], v, torch.tensor([0, 8], dtype=torch.int32), 8)


def test_cpu_tensors_use_grouped_sdpa():
    assert attention.backend_name("cpu", torch.bfloat16) == "_grouped_sdpa"
    assert attention.backend_name("cuda", torch.float32) == "_grouped_sdpa"
