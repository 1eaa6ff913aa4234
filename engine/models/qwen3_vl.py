"""Qwen3-VL (dense): the Qwen3-VL vision tower + the Qwen3 language model with interleaved M-RoPE
and DeepStack.

Caller: engine.runner.model_runner (forward, compute_logits, get_mrope_positions) and
engine.runner.encoder_runner (embed_multimodal, embed_input_ids, embed_token_id), through the
registry. Composition, checked two-layout weight loading (`visual.*` / `model.visual.*`,
`model.*` / `model.language_model.*`) and the data-parallel tower under TP are Qwen2-VL's
(engine.models.qwen2_vl); what differs:

  * an item's embedding rows are [tokens, H * (1 + k)]: the merger's row, then the k DeepStack
    rows (vision.towers.qwen3_vl). `embed_input_ids` pads token rows with k*H zeros, so the
    encoder runner's scatter carries DeepStack rows to exactly the vision positions of a step,
    whichever chunk they fall in; the LM splits them off (engine.models.qwen3).
  * a video's placeholder span holds "<t seconds><|vision_start|>pads<|vision_end|>" per temporal
    group (vision.processors.qwen3_vl): only the pad tokens take rows (`embed_token_id`), and each
    run of pads is its own M-RoPE grid (engine.models.mrope.qwen3_vl_mrope_positions).

Pipeline parallelism: the DeepStack layers (the first k) must sit on the first stage, which holds
the embeddings; any other split is refused at construction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.distributed.parallel_context import SINGLE_RANK, ParallelContext
from engine.models.mrope import qwen3_vl_mrope_positions
from engine.models.qwen2_vl import Qwen2VLForConditionalGeneration
from engine.models.qwen3 import Qwen3Model
from vision.inputs import IMAGE, VIDEO, MultiModalItem
from vision.towers.qwen3_vl import Qwen3VisionTransformer


class Qwen3VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    tower_class: type[nn.Module] = Qwen3VisionTransformer
    language_model_class: type[nn.Module] = Qwen3Model

    def __init__(self, config: Any, parallel: ParallelContext = SINGLE_RANK):
        super().__init__(config, parallel)
        self.num_deepstack_layers = len(config.vision_config.deepstack_visual_indexes)
        text_config = config.get_text_config()
        if self.num_deepstack_layers > text_config.num_hidden_layers:
            raise ValueError(f"vision_config.deepstack_visual_indexes has {self.num_deepstack_layers} entries; "
                             f"the language model has only {text_config.num_hidden_layers} layers")
        if not parallel.is_first_stage and self.model.start_layer < self.num_deepstack_layers:
            raise ValueError(f"--pipeline-parallel-size: DeepStack feeds decoder layers "
                             f"0..{self.num_deepstack_layers - 1}, which must all be on the first stage "
                             f"(this split gives it layers 0..{self.model.start_layer - 1})")
        self.mm_embed_dim = self.hidden_size * (1 + self.num_deepstack_layers)
        self.pad_token_ids = {IMAGE: int(config.image_token_id), VIDEO: int(config.video_token_id)}
        self.embed_token_id = tuple(self.pad_token_ids.values())  # the rows of a span that take embeddings

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] -> [T, H * (1 + k)]: token embeddings, zeros where DeepStack rows go."""
        embeds = self.model.embed_tokens(input_ids)                          # [T, H]
        padding = embeds.new_zeros(embeds.shape[0], self.mm_embed_dim - self.hidden_size)
        return torch.cat([embeds, padding], dim=-1)

    def get_mrope_positions(self, prompt_token_ids: list[int],
                            mm_items: list[MultiModalItem]) -> tuple[torch.Tensor, int]:
        """(positions [3, len(prompt)] int64 on the CPU, decode delta); text positions for items
        whose grid does not match their span (the encoder runner fails that request)."""
        try:
            return qwen3_vl_mrope_positions(prompt_token_ids, mm_items, self.spatial_merge_size,
                                            self.pad_token_ids)
        except ValueError:
            return torch.arange(len(prompt_token_ids)).expand(3, -1).clone(), 0
