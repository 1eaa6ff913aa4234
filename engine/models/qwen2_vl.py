"""Qwen2-VL: the Qwen2-VL vision tower + the Qwen2 language model with M-RoPE.

Caller: engine.runner.model_runner (forward, compute_logits, get_mrope_positions) and
engine.runner.encoder_runner (embed_multimodal, embed_input_ids). The wrapper only composes: the
tower lives in vision.towers, the decoder in engine.models.qwen2, the 3D positions in
engine.models.mrope. Vision rows reach the LM as `inputs_embeds`, merged by the encoder runner.

Checkpoint layouts accepted (both seen in the wild; `load_weights` renames, then checks):

    original hub (Qwen/Qwen2.5-VL-3B-Instruct)    transformers 5 save_pretrained
    visual.*                                      model.visual.*
    model.embed_tokens / model.layers / model.norm model.language_model.{embed_tokens,layers,norm}
    lm_head.weight (absent or ignored when tied)  lm_head.weight

Parallelism: the language model is sharded / staged as engine.models.qwen2 describes. The tower
is replicated on the first pipeline stage only (`--mm-encoder-tp-mode data`): under TP a step's
items are split across the ranks and their embeddings all-gathered (engine.distributed.mm_encoder).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.layers.attention import AttentionMetadata
from engine.layers.embedding import LMHead
from engine.models.mrope import mrope_positions
from engine.distributed.mm_encoder import encode_data_parallel
from engine.distributed.parallel_context import SINGLE_RANK, ParallelContext
from engine.models.qwen2 import (KVCache, Qwen2ForCausalLM, Qwen2Model, make_lm_head, stage_skip_prefixes,
                                 stage_weights)
from engine.weights import Weights, load_named_weights, rename
from vision.inputs import MultiModalItem
from vision.towers import Qwen2VisionTransformer

_VISUAL = "visual."


class Qwen2VLForConditionalGeneration(nn.Module):
    packed_modules_mapping = Qwen2ForCausalLM.packed_modules_mapping
    # Checkpoint prefix -> our prefix, first match wins (so the transformers-5 rules come first).
    # The identity rules name the original hub layout explicitly; anything else is unexpected.
    hf_to_ours_prefixes: dict[str, str] = {
        "model.visual.": "visual.",
        "model.language_model.": "model.",
        "visual.": "visual.",
        "model.": "model.",
        "lm_head.": "lm_head.",
    }
    tower_class: type[nn.Module] = Qwen2VisionTransformer
    language_model_class: type[nn.Module] = Qwen2Model
    embed_token_id: int | None = None   # every placeholder row takes a vision row (MultiModalModel)

    def __init__(self, config: Any, parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        self.config = config
        self.parallel = parallel
        text_config = config.get_text_config()
        self.hidden_size = text_config.hidden_size
        self.spatial_merge_size = int(config.vision_config.spatial_merge_size)
        self.tokens_per_second = self._tokens_per_second(config.vision_config)
        self.visual = self.tower_class(config.vision_config) if parallel.is_first_stage else None
        self.model = self.language_model_class(text_config, parallel)
        self.mm_embed_dim = self.hidden_size  # width of one item's embedding rows (Qwen3-VL: wider)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head: LMHead | None = make_lm_head(text_config, self.model, self.tie_word_embeddings, parallel)

    @staticmethod
    def _tokens_per_second(vision_config: Any) -> float | None:
        return None  # Qwen2-VL: a video's temporal positions advance one per grid step

    # ---- the step ---------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                attn_metadata: AttentionMetadata, kv_caches: list[KVCache],
                inputs_embeds: torch.Tensor | None = None, intermediate_tensors=None):
        """input_ids [T] or inputs_embeds [T, H] (vision rows merged); positions [3, T] -> [T, H]
        (or a non-last pipeline stage's (hidden, residual))."""
        return self.model(input_ids, positions, attn_metadata, kv_caches, inputs_embeds, intermediate_tensors)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        return self.model.embed_tokens(input_ids)

    def embed_multimodal(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values [N_patches, C*T*P*P] of all items, grid_thw [num_items, 3] (CPU int64)
        -> one [t*h*w / merge², H] embedding per item, in order."""
        if self.parallel.tp_size > 1:
            return encode_data_parallel(self.visual, pixel_values, grid_thw, self.spatial_merge_size,
                                        self.mm_embed_dim, self.parallel)
        embeds = self.visual(pixel_values, grid_thw)                 # [sum tokens, H]
        sizes = (grid_thw.prod(dim=-1) // self.spatial_merge_size**2).tolist()
        return list(embeds.split(sizes))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, vocab]
        return self.lm_head(hidden)

    def get_mrope_positions(self, prompt_token_ids: list[int],
                            mm_items: list[MultiModalItem]) -> tuple[torch.Tensor, int]:
        """(positions [3, len(prompt)] int64 on the CPU, delta for later positions).

        Items whose grid does not match their placeholder get text positions instead of an
        exception: the encoder runner fails that request when its step reaches the item (the
        embedding has the wrong size), and the rest of the batch is unaffected."""
        try:
            return mrope_positions(len(prompt_token_ids), mm_items, self.spatial_merge_size,
                                   self.tokens_per_second)
        except ValueError:
            return torch.arange(len(prompt_token_ids)).expand(3, -1).clone(), 0

    # ---- weights ----------------------------------------------------------------------------

    def load_weights(self, weights: Weights) -> set[str]:
        """Tower weights go to the tower's own loader (its names are relative to `visual.`); the
        LM and head go through the packed-shard loader. Unknown names raise ValueError; the caller
        (engine.weights.load_checked) fails on anything missing."""
        loaded_visual: set[str] = set()

        def language_weights():
            for ckpt_name, tensor in weights:
                name = rename(ckpt_name, self.hf_to_ours_prefixes)
                if name.startswith(_VISUAL) and self.visual is None:
                    continue  # the tower lives on the first pipeline stage
                if name.startswith(_VISUAL):
                    names = self.visual.load_weights([(name[len(_VISUAL):], tensor)])
                    loaded_visual.update(_VISUAL + n for n in names)
                else:
                    yield name, tensor

        params = {name: p for name, p in self.named_parameters() if not name.startswith(_VISUAL)}
        weights_here = stage_weights(language_weights(), self.tie_word_embeddings, self.lm_head, self.model)
        loaded = load_named_weights(params, weights_here, self.packed_modules_mapping,
                                    skip=stage_skip_prefixes(self.model, self.lm_head))
        return loaded | loaded_visual
