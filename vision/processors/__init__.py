"""Architecture -> media processor. Caller: `engine.frontend` (CPU half: process_image/_video,
expand_placeholders, num_tokens_for_size) and `engine.runner` (device half:
pixel_values_from_frames), both through `get_processor`.

Every processor class offers `from_pretrained(model_dir, hf_config, mm_processor_kwargs)` and the
methods listed in .notes/INTERFACES.md. To add a model family, add its architecture string(s) to
PROCESSORS with the "module:Class" that implements them; modules are imported on first use, so a
family's dependencies cost nothing to the others.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from vision.inputs import MultiModalItem, PlaceholderRange, ProcessedMedia


@functools.lru_cache(maxsize=64)
def channel_constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """[C] float32 on `device` (a mean or std per channel), made once per device: building it per item
    is a pageable host-to-device copy, which blocks the host until the device has run everything
    queued before it (W1 on the H200: 13% of the engine's host time, and the GPU queue drained at
    every image)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


class MediaProcessor(Protocol):
    """What engine.frontend (CPU half), engine.admission and engine.runner (device half) call."""

    def process_image(self, image: Image.Image, mm_kwargs: dict | None = None, detail: str | None = None,
                      uuid: str | None = None) -> ProcessedMedia: ...

    def process_video(self, frames: np.ndarray, fps: float, mm_kwargs: dict | None = None,
                      uuid: str | None = None) -> ProcessedMedia: ...

    def num_tokens_for_size(self, modality: str, height: int, width: int, num_frames: int = 1,
                            mm_kwargs: dict | None = None, detail: str | None = None) -> int: ...

    def video_sampling_kwargs(self, mm_kwargs: dict | None) -> dict[str, Any]: ...

    def expand_placeholders(self, prompt_token_ids: list[int],
                            media: list[ProcessedMedia]) -> tuple[list[int], list[PlaceholderRange]]: ...

    def pixel_values_from_frames(self, frames: torch.Tensor, item: MultiModalItem,
                                 dtype: torch.dtype) -> torch.Tensor: ...

PROCESSORS: dict[str, str] = {
    "Qwen2VLForConditionalGeneration": "vision.processors.qwen2_vl:Qwen2VLProcessor",
    "Qwen2_5_VLForConditionalGeneration": "vision.processors.qwen2_vl:Qwen2VLProcessor",
    "Qwen3VLForConditionalGeneration": "vision.processors.qwen3_vl:Qwen3VLProcessor",
    "InternVLForConditionalGeneration": "vision.processors.internvl:InternVLProcessor",
    "InternVLChatModel": "vision.processors.internvl:InternVLProcessor",
}


def get_processor(model_dir: str, hf_config: Any, mm_processor_kwargs: dict | None = None) -> MediaProcessor:
    """The processor for `hf_config`'s architecture, configured from `model_dir`'s processor files
    plus the server's --mm-processor-kwargs. ValueError for a model without a media processor."""
    architecture = _architecture(hf_config)
    target = PROCESSORS.get(architecture)
    if target is None:
        raise ValueError(f"model architecture {architecture!r} has no media processor "
                         f"(supported: {', '.join(sorted(PROCESSORS))})")
    module_name, class_name = target.split(":")
    processor_class = getattr(importlib.import_module(module_name), class_name)
    return processor_class.from_pretrained(model_dir, hf_config, mm_processor_kwargs)


def supports_media(hf_config: Any) -> bool:
    return _architecture(hf_config) in PROCESSORS


def _architecture(hf_config: Any) -> str:
    architectures = (hf_config.get("architectures") if isinstance(hf_config, dict)
                     else getattr(hf_config, "architectures", None))
    if not architectures:
        raise ValueError("the model config lists no architectures")
    return architectures[0]
