"""Model registry: HF `architectures[0]` string -> model class.

Caller: engine.config_loader (is the architecture supported?) and engine.runner.model_runner
(which class to build). VL models add their entries here.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from engine.models.qwen2 import Qwen2ForCausalLM
from engine.models.internvl import InternVLForConditionalGeneration
from engine.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from engine.models.qwen2_vl import Qwen2VLForConditionalGeneration
from engine.models.qwen3_vl import Qwen3VLForConditionalGeneration

@runtime_checkable
class MultiModalModel(Protocol):
    """A VL model: the runner's EncoderRunner calls these (engine/runner/encoder_runner.py)."""

    # The token whose rows take vision embedding rows; None: every placeholder row does.
    embed_token_id: int | None

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor: ...   # [T] -> [T, H]

    def embed_multimodal(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]: ...


@runtime_checkable
class MRoPEModel(Protocol):
    """A model with multimodal rotary positions (Qwen2-VL family): [3, T] positions per prompt."""

    def get_mrope_positions(self, prompt_token_ids: list, mm_items: list) -> tuple[torch.Tensor, int]: ...


_MODELS: dict[str, type[nn.Module]] = {
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "InternVLForConditionalGeneration": InternVLForConditionalGeneration,
    "InternVLChatModel": InternVLForConditionalGeneration,  # original layout (no remote code runs)
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "Qwen3VLForConditionalGeneration": Qwen3VLForConditionalGeneration,
}
# Known architectures we refuse on purpose, with the reason shown to the user.
_REFUSED: dict[str, str] = {
    "Qwen3VLMoeForConditionalGeneration": (
        "Qwen3-VL MoE checkpoints (30B-A3B, 235B-A22B) need fused MoE kernels, which vlserve does not have yet; "
        "the dense Qwen3-VL models (2B, 4B, 8B, 32B) are supported"),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_MODELS))


def refusal_reason(architecture: str) -> str | None:
    """Why a known architecture is not served (None when it is not one of those)."""
    return _REFUSED.get(architecture)


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture in _REFUSED:
        raise ValueError(f"architecture {architecture!r} is not supported: {_REFUSED[architecture]}")
    if architecture not in _MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return _MODELS[architecture]
