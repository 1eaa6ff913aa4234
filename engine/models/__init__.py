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
from engine.models.qwen3_vl import Qwen3VLForConditionalGeneration

_MODELS: dict[str, type[nn.Module]] = {
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "InternVLForConditionalGeneration": InternVLForConditionalGeneration,
    "InternVLChatModel": InternVLForConditionalGeneration,  # original layout, --trust-remote-code
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
