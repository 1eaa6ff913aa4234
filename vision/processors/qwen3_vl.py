"""Qwen3-VL media processing: transformers 5.23's Qwen3VLProcessor with its image processor
(Qwen2VLImageProcessor, patch 16) and Qwen3VLVideoProcessor, on the same two halves as Qwen2-VL
(vision.processors.qwen2_vl: CPU resize + grid + prompt in the API process, normalise + patchify on
the engine's device). Images are exactly Qwen2-VL's. Videos differ:

  * resize: smart_resize counts the frames in the pixel budget (t * h * w within
    [shortest_edge, longest_edge]), upscales sides below one merged patch first, and
    cap_pixels_per_frame caps a frame at min(max_video_tokens * factor², longest_edge / T),
    floored at 1.05 * shortest_edge;
  * frame sampling (URL videos, or vLLM's (frames, metadata) with do_sample_frames):
    vision.video.transformers_frame_indices;
  * the prompt: the video's `<|video_pad|>` becomes, per temporal group of temporal_patch_size
    frames, "<{t:.1f} seconds><|vision_start|>" + pads + "<|vision_end|>", t the mean source time
    (frame index / source fps) of the group's first and last frame (an odd count repeats the last
    frame). Example, 4 frames at 2 fps from frames 0..3, 2 pads per group:
        <|vision_start|><0.2 seconds><|vision_start|>PP<|vision_end|>
            <1.2 seconds><|vision_start|>PP<|vision_end|><|vision_end|>     (one line in the prompt)
    The outer start/end come from the chat template. The timestamps are tokenised alone: in the
    rendered prompt they always sit between special tokens, where the tokenizer splits anyway.

Caller: `engine.frontend` and `engine.runner.encoder_runner`, through vision.processors.get_processor.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np

from vision.hashing import mm_hash
from vision.inputs import VIDEO, MediaError, ProcessedMedia
from vision.processors.qwen2_vl import (Qwen2VLProcessingConfig, Qwen2VLProcessor, _config_int, _read_processor_dicts,
                                        resize_frames)
from vision.video import VideoFrames

_QWEN3_MAX_VIDEO_TOKENS = 768  # Qwen3VLVideoProcessor.max_video_tokens
_SAMPLING_DEFAULT_KEYS = ("fps", "min_frames", "max_frames")


def smart_resize_video(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' qwen3_vl video smart_resize (frames count in the budget)."""
    if num_frames < temporal_factor:
        raise MediaError(f"a video needs at least {temporal_factor} frames, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"the media's aspect ratio must be below 200, got {max(height, width) / min(height, width):g}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def group_timestamps(frame_indices: list[int], video_fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal group: the mean time of its first and last frame (Qwen3VLProcessor
    ._calculate_timestamps; an incomplete last group repeats the last frame)."""
    indices = list(frame_indices)
    if pad := -len(indices) % temporal_patch_size:
        indices += [indices[-1]] * pad
    times = [index / video_fps for index in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


class Qwen3VLProcessor(Qwen2VLProcessor):
    """One per served model; stateless after construction (the tokenizer is loaded on first use)."""

    def __init__(self, config: Qwen2VLProcessingConfig, model_dir: str, vision_start_id: int, vision_end_id: int,
                 sampling_defaults: dict):
        super().__init__(config)
        self.model_dir = model_dir
        self.vision_start_id, self.vision_end_id = vision_start_id, vision_end_id
        self.sampling_defaults = sampling_defaults  # the checkpoint's fps / min_frames / max_frames

    @classmethod
    def from_pretrained(cls, model_dir: str, hf_config: Any,
                        mm_processor_kwargs: dict | None = None) -> "Qwen3VLProcessor":
        config = Qwen2VLProcessingConfig.from_pretrained(model_dir, hf_config, mm_processor_kwargs)
        _, video_dict = _read_processor_dicts(model_dir)
        if "max_video_tokens" not in (mm_processor_kwargs or {}) and video_dict.get("max_video_tokens") is None:
            config = dataclasses.replace(config, max_video_tokens=_QWEN3_MAX_VIDEO_TOKENS)
        defaults = {key: video_dict[key] for key in _SAMPLING_DEFAULT_KEYS if video_dict.get(key) is not None}
        return cls(config, model_dir, _config_int(hf_config, "vision_start_token_id"),
                   _config_int(hf_config, "vision_end_token_id"), defaults)

    @functools.cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=False)

    # ---- CPU half ----------------------------------------------------------------------------

    def process_video(self, frames: np.ndarray, fps: float, mm_kwargs: dict | None = None,
                      uuid: str | None = None, metadata: VideoFrames | None = None) -> ProcessedMedia:
        """frames [T, H, W, 3] uint8, already sampled; metadata: where they come from (timestamps)."""
        if metadata is None:
            raise ValueError("Qwen3-VL needs video metadata for its frame timestamps: pass the video as (frames, "
                             "{'fps': ..., 'frames_indices': [...], 'total_num_frames': ..., 'duration': ..., "
                             "'do_sample_frames': False}) or as vision.video.VideoFrames, not a bare array")
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) < 1:
            raise ValueError(f"video frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        settings = self.config.video
        num_frames, src_height, src_width = frames.shape[:3]
        height, width = smart_resize_video(num_frames, src_height, src_width, settings.temporal_patch_size,
                                           settings.factor, *self._video_pixel_bounds(num_frames, mm_kwargs))
        frames = resize_frames(frames, height, width, settings.resample)
        grid_thw = (-(-num_frames // settings.temporal_patch_size), height // settings.patch_size,
                    width // settings.patch_size)
        times = group_timestamps(list(metadata.frame_indices), metadata.video_fps, settings.temporal_patch_size)
        ids = self._video_placeholder_ids(times, grid_thw[1] * grid_thw[2] // settings.merge_size**2)
        hash_settings = {"processor": "qwen3_vl", "modality": VIDEO, **settings.hash_fields(),
                         "pixel_bounds": list(self._video_pixel_bounds(num_frames, mm_kwargs))}
        return ProcessedMedia(modality=VIDEO, frames=frames, grid_thw=grid_thw, num_tokens=len(ids),
                              second_per_grid_t=settings.temporal_patch_size / fps, placeholder_ids=tuple(ids),
                              mm_hash=mm_hash(frames if uuid is None else None, hash_settings, uuid))

    def num_tokens_for_size(self, modality: str, height: int, width: int, num_frames: int = 1,
                            mm_kwargs: dict | None = None, detail: str | None = None) -> int:
        """Embedding rows of an item of this source size. For a video that is a lower bound of its
        placeholder span (timestamps and vision start/end come on top), which is what admission needs."""
        if modality != VIDEO:
            return super().num_tokens_for_size(modality, height, width, num_frames, mm_kwargs, detail)
        settings = self.config.video
        resized_height, resized_width = smart_resize_video(num_frames, height, width, settings.temporal_patch_size,
                                                           settings.factor,
                                                           *self._video_pixel_bounds(num_frames, mm_kwargs))
        grid_t = -(-num_frames // settings.temporal_patch_size)
        return grid_t * (resized_height // settings.patch_size) * (resized_width // settings.patch_size) \
            // settings.merge_size**2

    def video_sampling_kwargs(self, mm_kwargs: dict | None) -> dict[str, Any]:
        """decode_video keyword arguments: the checkpoint's sampling defaults, the server's and the
        request's mm_processor_kwargs on top, and transformers' Qwen3-VL sampling rule."""
        kwargs = super().video_sampling_kwargs(mm_kwargs)
        defaults = {k: v for k, v in self.sampling_defaults.items() if k not in kwargs and "nframes" not in kwargs}
        return {**defaults, **kwargs, "sampling": "transformers"}

    # ---- helpers -------------------------------------------------------------------------------

    def _video_pixel_bounds(self, num_frames: int, mm_kwargs: dict | None) -> tuple[int, int]:
        """(min_pixels, max_pixels) of the whole clip (t * h * w), with transformers' per-frame cap."""
        settings = self.config.video
        min_pixels, max_pixels = self._pixel_bounds(settings, mm_kwargs, None)
        if self.config.cap_pixels_per_frame:
            frame_cap = self.config.max_video_tokens * settings.factor * settings.factor
            per_frame = max(min(frame_cap, max_pixels // num_frames), int(min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        return min_pixels, max_pixels

    def _video_placeholder_ids(self, times: list[float], pads_per_group: int) -> list[int]:
        pad = self.config.video_token_id
        ids: list[int] = []
        for seconds in times:
            ids += self.tokenizer.encode(f"<{seconds:.1f} seconds>", add_special_tokens=False)
            ids += [self.vision_start_id] + [pad] * pads_per_group + [self.vision_end_id]
        return ids
