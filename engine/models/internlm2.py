"""InternLM2 / InternLM2.5 decoder-only language model (the LM of InternVL2.5-2B / -8B / -26B).

Caller: engine.models.internvl (as its language model) and engine.runner.model_runner. Same
blocks as Qwen2 (RMSNorm pre-norm, GQA attention with 1D rotary, SwiGLU), under InternLM2's own
names and with its packed `wqkv`, which interleaves q/k/v per KV group:

    wqkv rows: | q(g0,h0) .. q(g0,h_{G-1}) k(g0) v(g0) | q(g1,h0) .. k(g1) v(g1) | ...   (D rows each)

`PackedQKVLinear` keeps q|k|v back to back (as QKVLinear) and reorders the checkpoint rows on load.
transformers ships no InternLM2 class; the checkpoints' remote code is never run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.embedding import LMHead, VocabEmbedding
from engine.layers.linear import Linear, MergedLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.models.qwen2 import KVCache, head_dim_of
from engine.weights import Weights, load_named_weights


def rope_theta_of(config: Any) -> float:
    """InternLM2's rope_theta; `dynamic` NTK scaling only changes positions past
    max_position_embeddings, which max_model_len never allows, so it is exact here."""
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("type", scaling.get("rope_type", "default"))
    if kind not in ("default", "dynamic"):
        raise ValueError(f"llm_config.rope_scaling type {kind!r} is not supported (default, dynamic)")
    return float(getattr(config, "rope_theta", 10000.0))


class PackedQKVLinear(Linear):
    """[q | k | v] rows; loads InternLM2's group-interleaved `wqkv` (module docstring)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
        self.head_dim, self.num_kv_heads, self.groups = head_dim, num_kv_heads, num_heads // num_kv_heads
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias)
        for param in self.parameters():
            param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if loaded.shape != param.shape:
            raise ValueError(f"wqkv: expected {tuple(param.shape)}, got {tuple(loaded.shape)}")
        rows = loaded.reshape(self.num_kv_heads, self.groups + 2, self.head_dim, *loaded.shape[1:])
        q = rows[:, :self.groups].reshape(self.q_size, *loaded.shape[1:])
        k = rows[:, self.groups].reshape(self.kv_size, *loaded.shape[1:])
        v = rows[:, self.groups + 1].reshape(self.kv_size, *loaded.shape[1:])
        param.data.copy_(torch.cat([q, k, v]))

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class InternLM2Attention(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.head_dim = head_dim_of(config)
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        bias = bool(getattr(config, "bias", False))
        self.wqkv = PackedQKVLinear(config.hidden_size, self.head_dim, num_heads, num_kv_heads, bias)
        self.wo = Linear(num_heads * self.head_dim, config.hidden_size, bias=bias)
        rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings, rope_theta_of(config))
        self.attn = Attention(num_heads, self.head_dim, num_kv_heads, rotary_emb=rotary_emb)  # rotary fused inside

    def forward(self, positions, hidden, attn_metadata: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        q, k, v = self.wqkv.split(self.wqkv(hidden))                   # [T, Hq*D], [T, Hkv*D] x2, unrotated
        out = self.attn(q, k, v, attn_metadata, kv_cache, positions)   # [T, Hq*D]
        return self.wo(out)                                           # [T, H]


class InternLM2MLP(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"llm_config.hidden_act={config.hidden_act!r} is not supported (only silu)")
        self.w13 = MergedLinear(config.hidden_size, [config.intermediate_size] * 2, bias=False)  # w1 gate, w3 up
        self.act_fn = SiluAndMul()
        self.w2 = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self.w2(self.act_fn.of_projection(self.w13, hidden))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = InternLM2Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = InternLM2MLP(config)

    def forward(self, positions, hidden, residual, attn_metadata, kv_cache):
        """(hidden, residual) in and out, as Qwen2DecoderLayer (residual None for the first layer)."""
        if residual is None:
            hidden, residual = self.attention_norm(hidden), hidden
        else:
            hidden, residual = self.attention_norm(hidden, residual)
        hidden = self.attention(positions, hidden, attn_metadata, kv_cache)
        hidden, residual = self.ffn_norm(hidden, residual)
        return self.feed_forward(hidden), residual


class InternLM2Model(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.tok_embeddings = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, attn_metadata, kv_caches, inputs_embeds=None) -> torch.Tensor:
        """input_ids [T] (or inputs_embeds [T, H]); positions [T] -> hidden [T, H]."""
        hidden = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, attn_metadata, kv_cache)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class InternLM2ForCausalLM(nn.Module):
    packed_modules_mapping = {"w13": ["w1", "w3"]}
    hf_to_ours_prefixes: dict[str, str] = {}

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.model = InternLM2Model(config)
        tied = self.model.tok_embeddings if getattr(config, "tie_word_embeddings", False) else None
        self.output = LMHead(config.vocab_size, config.hidden_size, tied_embedding=tied)

    def forward(self, input_ids, positions, attn_metadata: AttentionMetadata, kv_caches: list[KVCache],
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata, kv_caches, inputs_embeds)  # [T, H]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        return self.model.tok_embeddings(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, vocab]
        return self.output(hidden)

    def load_weights(self, weights: Weights) -> set[str]:
        skip = ("output.",) if getattr(self.config, "tie_word_embeddings", False) else ()
        return load_named_weights(dict(self.named_parameters()), weights, self.packed_modules_mapping,
                                  self.hf_to_ours_prefixes, skip=skip)
