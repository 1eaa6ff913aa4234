"""Packed linear layers: each checkpoint shard lands in its rows, and the fused matmul equals the
separate projections (the oracle: F.linear per checkpoint matrix)."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from engine.layers.linear import MergedLinear, QKVLinear
from engine.layers.norm import RMSNorm


def test_qkv_shards_equal_separate_projections():
    layer = QKVLinear(hidden_size=24, head_dim=8, num_heads=6, num_kv_heads=2, bias=True)
    weights = {s: torch.randn(n, 24) for s, n in (("q", 48), ("k", 16), ("v", 16))}
    biases = {s: torch.randn(w.shape[0]) for s, w in weights.items()}
    for shard in ("v", "q", "k"):   # any arrival order
        layer.weight.weight_loader(layer.weight, weights[shard], shard)
        layer.bias.weight_loader(layer.bias, biases[shard], shard)
    x = torch.randn(5, 24)
    q, k, v = layer.split(layer(x))
    for shard, out in zip("qkv", (q, k, v)):
        torch.testing.assert_close(out, F.linear(x, weights[shard], biases[shard]))
    assert layer.weight.shard_ids == ("q", "k", "v")
    with pytest.raises(ValueError, match="shard shape mismatch"):
        layer.weight.weight_loader(layer.weight, torch.randn(47, 24), "q")
    with pytest.raises(ValueError, match="unknown qkv shard id"):
        layer.weight.weight_loader(layer.weight, weights["q"], "x")


def test_merged_gate_up():
    layer = MergedLinear(10, [7, 7])
    gate, up = torch.randn(7, 10), torch.randn(7, 10)
    layer.weight.weight_loader(layer.weight, up, 1)
    layer.weight.weight_loader(layer.weight, gate, 0)
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer(x), torch.cat([x @ gate.T, x @ up.T], dim=-1))


def test_rms_norm_with_and_without_residual_matches_hf():
    hf = Qwen2RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        hf.weight.normal_()
    ours = RMSNorm(16, eps=1e-5)
    ours.weight.data.copy_(hf.weight)
    x, residual = torch.randn(4, 16), torch.randn(4, 16)
    torch.testing.assert_close(ours(x), hf(x))
    normed, new_residual = ours(x, residual)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(normed, hf(x + residual))
