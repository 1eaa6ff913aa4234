"""Model registry: HF `architectures[0]` string -> model class.

Caller: engine.config_loader (is the architecture supported?) and engine.runner.model_runner
(which class to build). VL models add their entries here.
"""

from __future__ import annotations

from torch import nn

from engine.models.qwen2 import Qwen2ForCausalLM
from engine.models.internvl import InternVLForConditionalGeneration
from engine.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from engine.models.qwen2_vl import Qwen2VLForConditionalGeneration

_MODELS: dict[str, type[nn.Module]] = {
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "InternVLForConditionalGeneration": InternVLForConditionalGeneration,
    "InternVLChatModel": InternVLForConditionalGeneration,  # original layout (no remote code runs)
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(_MODELS))


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return _MODELS[architecture]
