"""InternVL2.5: InternViT (+ pixel shuffle + mlp1, vision.towers.intern_vit) and a Qwen2 or
InternLM2 language model with plain 1D rotary positions.

Caller: engine.runner.model_runner (forward, compute_logits) and engine.runner.encoder_runner
(embed_multimodal, embed_input_ids, `embed_token_id`: only the `<IMG_CONTEXT>` rows of a placeholder
take vision rows; its `<img>`, `</img>` and "FrameN: " tokens keep their own embeddings).

Two checkpoint layouts, one class:

    transformers (InternVLForConditionalGeneration)   original OpenGVLab (InternVLChatModel, remote code)
    vision_tower.* (q/k/v_proj, lambda_1, ...)        vision_model.* (attn.qkv, ls1, ...)
    multi_modal_projector.{layer_norm,linear_*}       mlp1.{0,1,3}
    language_model.model.*, language_model.lm_head.*   language_model.model.*, language_model.{lm_head,output}.*
    (in memory also model.language_model.*, lm_head.*, model.vision_tower.*; both accepted)

The original config.json cannot be read by transformers without running the checkpoint's code;
`read_internvl_chat_config` (registered in engine.config_loader) builds an equivalent config object.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from engine.layers.attention import AttentionMetadata
from engine.models.internlm2 import InternLM2ForCausalLM
from engine.models.qwen2 import KVCache, Qwen2ForCausalLM
from engine.weights import Weights
from vision.towers.intern_vit import InternViTConfig, InternVisionTower, merge_shard_keys

ORIGINAL_ARCHITECTURE = "InternVLChatModel"
_LANGUAGE_MODELS = {"qwen2": Qwen2ForCausalLM, "internlm2": InternLM2ForCausalLM}


class InternVLForConditionalGeneration(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.is_original = (getattr(config, "architectures", None) or [""])[0] == ORIGINAL_ARCHITECTURE
        text_config = self._text_config(config)
        vision = InternViTConfig.from_configs(
            config.vision_config, text_config.hidden_size, downsample_ratio=float(config.downsample_ratio),
            select_layer=int(getattr(config, "select_layer", getattr(config, "vision_feature_layer", -1))),
            ps_version=getattr(config, "ps_version", "v2") or "v2",
            projector_act=getattr(config, "projector_hidden_act", "gelu") or "gelu",
            image_size=getattr(config, "force_image_size", None))
        self.embed_token_id = int(config.image_token_id)
        self.vision_tower = InternVisionTower(vision)
        self.language_model = _LANGUAGE_MODELS[text_config.model_type](text_config)

    def _text_config(self, config: Any) -> Any:
        """The LM's config; transformers' layout ties the head by the top-level flag."""
        text_config = config.get_text_config()
        model_type = getattr(text_config, "model_type", None)
        if model_type not in _LANGUAGE_MODELS:
            raise ValueError(f"InternVL language model type {model_type!r} is not supported "
                             f"(supported: {', '.join(_LANGUAGE_MODELS)})")
        if not self.is_original:
            text_config = copy.copy(text_config)
            text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        return text_config

    # ---- the step ---------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                attn_metadata: AttentionMetadata, kv_caches: list[KVCache],
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] or inputs_embeds [T, H] (vision rows merged); positions [T] -> [T, H]."""
        return self.language_model(input_ids, positions, attn_metadata, kv_caches, inputs_embeds)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        return self.language_model.embed_input_ids(input_ids)

    def embed_multimodal(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values [num_tiles, 3, S, S] of all items, grid_thw [num_items, 3] = (tiles, 1, 1)
        -> one [tiles * num_image_token, H] embedding per item, in order."""
        embeds = self.vision_tower(pixel_values, grid_thw)  # [num_tiles * tokens_per_tile, H]
        sizes = (grid_thw[:, 0] * self.vision_tower.config.tokens_per_tile).tolist()
        return list(embeds.split(sizes))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, vocab]
        return self.language_model.compute_logits(hidden)

    # ---- weights ----------------------------------------------------------------------------

    def load_weights(self, weights: Weights) -> set[str]:
        """Vision names go to the tower's loader, LM names (renamed to the LM's own) to the LM's."""
        loaded_vision: set[str] = set()

        def language_weights():
            for ckpt_name, tensor in weights:
                name = self._normalized(ckpt_name)
                if name.startswith("language_model."):
                    yield name[len("language_model."):], tensor
                else:
                    loaded_vision.update(self.vision_tower.load_weights(
                        [(name, tensor)], hf_native=not self.is_original, merge_shards=False))

        loaded = self.language_model.load_weights(language_weights())
        return {"language_model." + n for n in loaded} | {"vision_tower." + n for n in merge_shard_keys(loaded_vision)}

    def _normalized(self, name: str) -> str:
        """Checkpoint name -> `language_model.<LM's name>` or the tower's name. transformers keeps
        two spellings of its layout: on disk (hub `-hf` checkpoints, save_pretrained) the legacy
        `language_model.model.*` / `language_model.lm_head.*` / `vision_tower.*`, in memory
        `model.language_model.*` / `lm_head.*` / `model.vision_tower.*`."""
        if self.is_original:
            return name
        if name.startswith("lm_head."):
            return "language_model." + name
        name = name[len("model."):] if name.startswith("model.") else name
        if name.startswith("language_model.") and not name.startswith(("language_model.model.",
                                                                      "language_model.lm_head.")):
            return "language_model.model." + name[len("language_model."):]
        return name


# ---- the original layout's config ------------------------------------------------------------

class InternVLChatConfig(SimpleNamespace):
    """Attribute view of an original InternVL config.json (what transformers would build by running
    its configuration_internvl_chat.py), plus the `<IMG_CONTEXT>` id read from the tokenizer."""

    def get_text_config(self, decoder: bool | None = None) -> Any:
        return self.llm_config


def _llm_config(raw: dict) -> Any:
    model_type = raw.get("model_type")
    if model_type == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")},
                           architectures=raw.get("architectures"))
    if model_type == "internlm2":
        defaults = {"bias": False, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
                    "hidden_act": "silu", "rms_norm_eps": 1e-6}
        return SimpleNamespace(**{**defaults, **raw})
    raise ValueError(f"llm_config.model_type {model_type!r} is not supported (supported: qwen2, internlm2)")


def _context_token_id(path: str) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # never run checkpoint code
    token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"--model: the tokenizer in {path} has no <IMG_CONTEXT> token")
    return int(token_id)


def read_internvl_chat_config(path: str, raw: dict) -> InternVLChatConfig:
    """engine.config_loader's reader for architectures ["InternVLChatModel"]."""
    for key in ("llm_config", "vision_config"):
        if not isinstance(raw.get(key), dict):
            raise ValueError(f"--model: {os.path.join(path, 'config.json')} has no {key}")
    llm_config = _llm_config(raw["llm_config"])
    fields = {k: v for k, v in raw.items() if k not in ("llm_config", "vision_config")}
    fields.setdefault("tie_word_embeddings", bool(getattr(llm_config, "tie_word_embeddings", False)))
    fields.update(llm_config=llm_config, text_config=llm_config, vision_config=SimpleNamespace(**raw["vision_config"]),
                  image_token_id=_context_token_id(path), eos_token_id=getattr(llm_config, "eos_token_id", None),
                  dtype=raw.get("torch_dtype"), downsample_ratio=float(raw.get("downsample_ratio", 0.5)))
    return InternVLChatConfig(**fields)
