"""Qwen3 decoder (the language model of Qwen3-VL) over the paged KV cache, with DeepStack.

Caller: engine.models.qwen3_vl, which embeds a Qwen3Model as its language model. It is Qwen2's
decoder (engine.models.qwen2: same SwiGLU MLP, pre-norm residual stream, TP/PP sharding) with:
  * QK-norm: an RMSNorm over head_dim on every query and key head, before the rotary;
  * no q/k/v bias (`attention_bias`, False in every released checkpoint), explicit head_dim;
  * M-RoPE with interleaved t/h/w frequencies when the config has an mrope_section (Qwen3-VL);
  * DeepStack: vision features of the tower's intermediate blocks, added to the hidden state of
    the first k decoder layers at the vision rows (transformers' `_deepstack_process`):

        h_0 = inputs_embeds[:, :H]          ds = inputs_embeds[:, H:].view(T, k, H)  (0 on text rows)
        h_{i+1} = layer_i(h_i) + ds[:, i]   for i < k;   h_{i+1} = layer_i(h_i) after

    Text rows carry zeros, so adding everywhere is the same sum as adding at the vision rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.distributed.parallel_context import SINGLE_RANK, ParallelContext
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.linear import QKVLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, rope_parameters
from engine.models.qwen2 import KVCache, Qwen2DecoderLayer, Qwen2MLP, Qwen2Model, head_dim_of


class Qwen3Attention(nn.Module):
    def __init__(self, config: Any, parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        self.head_dim = head_dim_of(config)
        theta, mrope_section = rope_parameters(config)
        self.qkv_proj = QKVLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                  config.num_key_value_heads, bias=bool(getattr(config, "attention_bias", False)),
                                  parallel=parallel)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=bool(getattr(config, "attention_bias", False)), parallel=parallel)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings, theta, mrope_section,
                                     mrope_interleaved=mrope_section is not None)
        self.attn = Attention(self.qkv_proj.num_heads, self.head_dim, self.qkv_proj.num_kv_heads,
                              rotary_emb=rotary_emb)  # rotary fused with the K/V-cache write

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, attn_metadata: AttentionMetadata,
                kv_cache: KVCache) -> torch.Tensor:
        return self.o_proj(self.attend(positions, hidden, attn_metadata, kv_cache))   # [T, H]

    def attend(self, positions: torch.Tensor, hidden: torch.Tensor, attn_metadata: AttentionMetadata,
               kv_cache: KVCache) -> torch.Tensor:
        """Everything before the output projection: [T, H] -> [T, Hq*D]."""
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))                   # [T, Hq*D], [T, Hkv*D] x2
        # QK-norm per head here, then the rotary inside attn (fused with the K/V-cache write): HF's order.
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(num_tokens, -1)     # [T, Hq*D]
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(num_tokens, -1)     # [T, Hkv*D]
        return self.attn(q, k, v, attn_metadata, kv_cache, positions)          # [T, Hq*D]


class Qwen3DecoderLayer(Qwen2DecoderLayer):
    """Qwen2's layer (same forward) around Qwen3Attention."""

    def __init__(self, config: Any, parallel: ParallelContext = SINGLE_RANK):
        nn.Module.__init__(self)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen3Attention(config, parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config, parallel)


class Qwen3Model(Qwen2Model):
    decoder_layer_class = Qwen3DecoderLayer

    def __init__(self, config: Any, parallel: ParallelContext = SINGLE_RANK):
        super().__init__(config, parallel)
        self.hidden_size = config.hidden_size

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                attn_metadata: AttentionMetadata, kv_caches: list[KVCache],
                inputs_embeds: torch.Tensor | None = None,
                intermediate_tensors: tuple[torch.Tensor, torch.Tensor] | None = None):
        """As Qwen2Model.forward, except that inputs_embeds may be [T, H * (1 + k)]: the token /
        vision rows, then the k DeepStack rows (module docstring)."""
        deepstack = None
        if intermediate_tensors is not None:
            hidden, residual = intermediate_tensors
        elif inputs_embeds is not None:
            hidden, residual = inputs_embeds[:, :self.hidden_size], None
            if inputs_embeds.shape[1] > self.hidden_size:
                deepstack = inputs_embeds[:, self.hidden_size:].view(hidden.shape[0], -1, self.hidden_size)
        else:
            hidden, residual = self.embed_tokens(input_ids), None
        for index in range(self.start_layer, self.end_layer):
            hidden, residual = self.layers[index](positions, hidden, residual, attn_metadata,
                                                  kv_caches[index - self.start_layer])
            if deepstack is not None and index < deepstack.shape[1]:
                if residual is not None:
                    hidden = hidden + residual                         # HF's residual + mlp output
                hidden, residual = hidden + deepstack[:, index], None  # [T, H]; zeros on text rows
        if not self.parallel.is_last_stage:
            return hidden, (residual if residual is not None else torch.zeros_like(hidden))
        return self.norm(hidden) if residual is None else self.norm(hidden, residual)[0]
