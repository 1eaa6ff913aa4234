"""Qwen2 / Qwen2.5 decoder-only language model over the paged KV cache.

Caller: engine.runner.model_runner (text models) and the VL models, which embed a Qwen2Model as
their language model and pass `inputs_embeds` with vision rows merged in and M-RoPE positions
[3, T]. Reads top to bottom: embed -> N x (attention + SwiGLU MLP, pre-norm, residual) -> norm
-> lm_head. All tokens of a step are one flattened ragged batch described by AttentionMetadata.

Parallelism comes in as a ParallelContext record (engine.distributed): tensor parallelism shards
heads, MLP rows and the vocabulary inside the layers; a pipeline stage builds only its decoder
layers (the others are empty placeholders, so parameter names keep the checkpoint's layer
numbers), the first stage the embedding, the last the final norm and lm_head. A stage that does
not end the pipeline returns (hidden, residual) for the next one instead of the final hidden.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.embedding import LMHead, VocabEmbedding
from engine.distributed.parallel_context import SINGLE_RANK, ParallelContext, layer_range
from engine.layers.linear import MergedLinear, QKVLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, rope_parameters
from engine.weights import Weights, load_named_weights, rename

KVCache = tuple[torch.Tensor, torch.Tensor]  # k, v: [num_blocks, block_size, num_kv_heads, head_dim]


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Qwen2Attention(nn.Module):
    def __init__(self, config: Any, parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        self.head_dim = head_dim_of(config)
        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        theta, mrope_section = rope_parameters(config)
        self.qkv_proj = QKVLinear(config.hidden_size, self.head_dim, num_heads, num_kv_heads, bias=True,
                                  parallel=parallel)
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, config.hidden_size, bias=False, parallel=parallel)
        rotary_emb = RotaryEmbedding(self.head_dim, config.max_position_embeddings, theta, mrope_section)
        # This rank's heads; the rotary runs inside, fused with the K/V-cache write.
        self.attn = Attention(self.qkv_proj.num_heads, self.head_dim, self.qkv_proj.num_kv_heads,
                              rotary_emb=rotary_emb)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, attn_metadata: AttentionMetadata,
                kv_cache: KVCache) -> torch.Tensor:
        return self.o_proj(self.attend(positions, hidden, attn_metadata, kv_cache))   # [T, H]

    def attend(self, positions: torch.Tensor, hidden: torch.Tensor, attn_metadata: AttentionMetadata,
               kv_cache: KVCache) -> torch.Tensor:
        """Everything before the output projection: [T, H] -> [T, Hq*D] (the layer fuses o_proj
        with the norm after it)."""
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))           # [T, Hq*D], [T, Hkv*D] x2, unrotated
        return self.attn(q, k, v, attn_metadata, kv_cache, positions)  # [T, Hq*D]


class Qwen2MLP(nn.Module):
    def __init__(self, config: Any, parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
        self.gate_up_proj = MergedLinear(config.hidden_size, [config.intermediate_size] * 2, bias=False,
                                         parallel=parallel)
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False, parallel=parallel)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self.down_proj(self.act_fn.of_projection(self.gate_up_proj, hidden))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: Any, parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config, parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config, parallel)

    def forward(self, positions, hidden, residual, attn_metadata, kv_cache):
        """hidden [T, H] is the previous layer's output, residual [T, H] the stream before it
        (None for the first layer). Returns the same pair for the next layer."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        out = self.self_attn.attend(positions, hidden, attn_metadata, kv_cache)          # [T, Hq*D]
        hidden, residual = self.post_attention_layernorm.of_projection(self.self_attn.o_proj, out, residual)
        return self.mlp(hidden), residual


class Qwen2Model(nn.Module):
    decoder_layer_class: type[nn.Module] = Qwen2DecoderLayer  # Qwen3 swaps in its QK-norm layer

    def __init__(self, config: Any, parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        if getattr(config, "use_sliding_window", False):
            raise ValueError("use_sliding_window=True (sliding-window attention) is not supported")
        self.parallel = parallel
        self.start_layer, self.end_layer = layer_range(config.num_hidden_layers, parallel.pp_rank, parallel.pp_size)
        self.embed_tokens = (VocabEmbedding(config.vocab_size, config.hidden_size, parallel)
                             if parallel.is_first_stage else None)
        # Layers of other stages are parameterless placeholders: names keep the layer numbers.
        self.layers = nn.ModuleList(
            self.decoder_layer_class(config, parallel) if self.start_layer <= i < self.end_layer else nn.Identity()
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if parallel.is_last_stage else None

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                attn_metadata: AttentionMetadata, kv_caches: list[KVCache],
                inputs_embeds: torch.Tensor | None = None,
                intermediate_tensors: tuple[torch.Tensor, torch.Tensor] | None = None):
        """input_ids [T] (or inputs_embeds [T, H]); positions [T] or [3, T]; kv_caches: this
        stage's layers only. -> hidden [T, H] on the last stage, else (hidden, residual) [T, H]
        each; later stages take the previous stage's pair as intermediate_tensors."""
        if intermediate_tensors is None:
            hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
            residual = None
        else:
            hidden, residual = intermediate_tensors
        for layer, kv_cache in zip(self.layers[self.start_layer:self.end_layer], kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, attn_metadata, kv_cache)
        if not self.parallel.is_last_stage:
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def missing_prefixes(self) -> tuple[str, ...]:
        """Parameter prefixes (relative to this module) that live on other pipeline stages."""
        missing = [f"layers.{i}." for i in range(len(self.layers))
                   if not self.start_layer <= i < self.end_layer]
        missing += [] if self.embed_tokens is not None else ["embed_tokens."]
        return tuple(missing + ([] if self.norm is not None else ["norm."]))


def make_lm_head(text_config: Any, model: Qwen2Model, tie_word_embeddings: bool,
                 parallel: ParallelContext) -> LMHead | None:
    """The last stage's head: the embedding's own matrix when tied and on this stage, else its own
    matrix (a tied model split over stages loads it from the embedding's checkpoint tensor)."""
    if not parallel.is_last_stage:
        return None
    tied = model.embed_tokens if tie_word_embeddings and model.embed_tokens is not None else None
    return LMHead(text_config.vocab_size, text_config.hidden_size, tied_embedding=tied, parallel=parallel)


def stage_weights(weights: Weights, tie_word_embeddings: bool, lm_head: LMHead | None,
                  model: Qwen2Model) -> Weights:
    """Checkpoint tensors (our names) as this stage loads them: a tied model's lm_head.* is the
    embedding and dropped, unless the head sits on a stage without the embedding; then the
    embedding's tensor fills the head."""
    head_from_embedding = tie_word_embeddings and lm_head is not None and model.embed_tokens is None
    for name, tensor in weights:
        if tie_word_embeddings and name.startswith("lm_head."):
            continue
        if head_from_embedding and name.startswith("model.embed_tokens."):
            yield "lm_head." + name[len("model.embed_tokens."):], tensor
        else:
            yield name, tensor


def stage_skip_prefixes(model: Qwen2Model, lm_head: LMHead | None) -> tuple[str, ...]:
    """Our-name prefixes of the checkpoint tensors another pipeline stage loads."""
    return tuple("model." + p for p in model.missing_prefixes()) + (() if lm_head is not None else ("lm_head.",))


class Qwen2ForCausalLM(nn.Module):
    # Fused module -> the checkpoint modules it holds, in shard order.
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    # Checkpoint prefix -> our prefix (HF layout changes; VL wrappers supply their own).
    hf_to_ours_prefixes: dict[str, str] = {}

    def __init__(self, config: Any, parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config, parallel)
        self.lm_head = make_lm_head(config, self.model, config.tie_word_embeddings, parallel)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                attn_metadata: AttentionMetadata, kv_caches: list[KVCache],
                inputs_embeds: torch.Tensor | None = None, intermediate_tensors=None):
        return self.model(input_ids, positions, attn_metadata, kv_caches, inputs_embeds,
                          intermediate_tensors)  # [T, H] (or the stage's (hidden, residual))

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        return self.model.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, vocab]
        return self.lm_head(hidden)

    def load_weights(self, weights: Weights) -> set[str]:
        # Tied checkpoints sometimes still ship lm_head.weight: it is the embedding (stage_weights).
        weights = ((rename(name, self.hf_to_ours_prefixes), tensor) for name, tensor in weights)
        weights = stage_weights(weights, self.config.tie_word_embeddings, self.lm_head, self.model)
        return load_named_weights(dict(self.named_parameters()), weights, self.packed_modules_mapping,
                                  skip=stage_skip_prefixes(self.model, self.lm_head))
