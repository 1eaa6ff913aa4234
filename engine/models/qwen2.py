"""Qwen2 / Qwen2.5 decoder-only language model over the paged KV cache.

Caller: engine.runner.model_runner (text models) and the VL models, which embed a Qwen2Model as
their language model and pass `inputs_embeds` with vision rows merged in and M-RoPE positions
[3, T]. Reads top to bottom: embed -> N x (attention + SwiGLU MLP, pre-norm, residual) -> norm
-> lm_head. All tokens of a step are one flattened ragged batch described by AttentionMetadata.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.embedding import LMHead, VocabEmbedding
from engine.layers.linear import Linear, MergedLinear, QKVLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, rope_parameters
from engine.weights import Weights, load_named_weights

KVCache = tuple[torch.Tensor, torch.Tensor]  # k, v: [num_blocks, block_size, num_kv_heads, head_dim]


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Qwen2Attention(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.head_dim = head_dim_of(config)
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        theta, mrope_section = rope_parameters(config)
        self.qkv_proj = QKVLinear(config.hidden_size, self.head_dim, num_heads, num_kv_heads, bias=True)
        self.o_proj = Linear(num_heads * self.head_dim, config.hidden_size, bias=False)
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings, theta, mrope_section)
        self.attn = Attention(num_heads, self.head_dim, num_kv_heads)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, attn_metadata: AttentionMetadata,
                kv_cache: KVCache) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))           # [T, Hq*D], [T, Hkv*D] x2
        q, k = self.rotary_emb(positions, q.view(num_tokens, -1, self.head_dim),
                               k.view(num_tokens, -1, self.head_dim))  # [T, Hq, D], [T, Hkv, D]
        out = self.attn(q.reshape(num_tokens, -1), k.reshape(num_tokens, -1), v, attn_metadata, kv_cache)
        return self.o_proj(out)                                        # [T, H]


class Qwen2MLP(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
        self.gate_up_proj = MergedLinear(config.hidden_size, [config.intermediate_size] * 2, bias=False)
        self.act_fn = SiluAndMul()
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self.down_proj(self.act_fn(self.gate_up_proj(hidden)))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(self, positions, hidden, residual, attn_metadata, kv_cache):
        """hidden [T, H] is the previous layer's output, residual [T, H] the stream before it
        (None for the first layer). Returns the same pair for the next layer."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, attn_metadata, kv_cache)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Qwen2Model(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        if getattr(config, "use_sliding_window", False):
            raise ValueError("use_sliding_window=True (sliding-window attention) is not supported")
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                attn_metadata: AttentionMetadata, kv_caches: list[KVCache],
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] (or inputs_embeds [T, H]); positions [T] or [3, T] -> hidden [T, H]."""
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, attn_metadata, kv_cache)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Qwen2ForCausalLM(nn.Module):
    # Fused module -> the checkpoint modules it holds, in shard order.
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    # Checkpoint prefix -> our prefix (HF layout changes; VL wrappers supply their own).
    hf_to_ours_prefixes: dict[str, str] = {}

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = LMHead(config.vocab_size, config.hidden_size, tied_embedding=tied)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                attn_metadata: AttentionMetadata, kv_caches: list[KVCache],
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata, kv_caches, inputs_embeds)  # [T, H]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        return self.model.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, vocab]
        return self.lm_head(hidden)

    def load_weights(self, weights: Weights) -> set[str]:
        # Tied checkpoints sometimes still ship lm_head.weight: it is the embedding, so drop it.
        skip = ("lm_head.",) if self.config.tie_word_embeddings else ()
        return load_named_weights(dict(self.named_parameters()), weights, self.packed_modules_mapping,
                                  self.hf_to_ours_prefixes, skip=skip)
