"""Qwen2.5-VL: Qwen2-VL's composition with the Qwen2.5-VL tower (window attention, RMSNorm,
SwiGLU) and time-aligned video positions (vision_config.tokens_per_second).

Caller: engine.runner.model_runner through the registry (engine.models). Everything else --
forward, embed_multimodal, M-RoPE positions, the checked two-layout weight loading -- is
engine.models.qwen2_vl's.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from engine.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vision.towers import Qwen2_5_VisionTransformer


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    tower_class: type[nn.Module] = Qwen2_5_VisionTransformer

    @staticmethod
    def _tokens_per_second(vision_config: Any) -> float | None:
        """A video's temporal position advances tokens_per_second * second_per_grid_t per grid step."""
        tokens_per_second = getattr(vision_config, "tokens_per_second", None)
        if tokens_per_second is None:
            raise ValueError("Qwen2.5-VL vision_config has no tokens_per_second")
        return float(tokens_per_second)
