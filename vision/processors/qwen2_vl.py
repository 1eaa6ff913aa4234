"""Qwen2-VL / Qwen2.5-VL media processing, split in two halves around the process boundary:

  API process (CPU)   process_image / process_video: smart_resize -> resized uint8 frames, grid_thw,
                      placeholder count, mm_hash; expand_placeholders for the prompt.
  engine (device)     pixel_values_from_frames: rescale + normalise + patchify -> pixel_values.

Together they reproduce transformers 5.23's Qwen2VLImageProcessor / Qwen2VLVideoProcessor (the
torchvision backend that AutoProcessor picks) exactly: same smart_resize, the same uint8
antialiased resize call, the same fused (x - mean/rescale) / (std/rescale) in float32 and the same
patch layout. Caller: `engine.frontend` (CPU half) and `engine.runner.encoder_runner` (device half),
through `vision.processors.get_processor`.

Patch layout of one item (rows = patches, in the order the tower's merger expects):
    [grid_t, grid_h/merge, grid_w/merge, merge, merge] x [channel, temporal_patch, patch, patch]
An image is one frame repeated to temporal_patch_size; a video is padded with its last frame up to
a multiple of temporal_patch_size.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vision.hashing import mm_hash
from vision.inputs import IMAGE, VIDEO, MediaError, MultiModalItem, PlaceholderRange, ProcessedMedia
from vision.processors import channel_constants
from vision.video import VideoFrames, video_sampling_kwargs

# OpenAI `detail: "low"`: at most 448x448 pixels, i.e. at most 256 tokens with 28-pixel merged patches.
LOW_DETAIL_MAX_PIXELS = 448 * 448
_PIXEL_KEYS = ("min_pixels", "max_pixels", "size")
_VIDEO_SAMPLING_KEYS = ("fps", "num_frames", "nframes", "min_frames", "max_frames")
_DETAILS = (None, "auto", "high", "low")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' qwen2_vl smart_resize: both sides multiples of `factor`, area in
    [min_pixels, max_pixels], aspect ratio kept as well as possible."""
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"the media's aspect ratio must be below 200, got {max(height, width) / min(height, width):g}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


_PIL_TO_TORCH_MODE = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}  # PIL resample -> torch mode
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' class defaults (Qwen2VLImageProcessor / Qwen2VLVideoProcessor `size`).
_DEFAULT_SIZE = {IMAGE: {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
                 VIDEO: {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}}
_SERVER_KEYS = ("min_pixels", "max_pixels", "size", "cap_pixels_per_frame", "max_video_tokens",
                "fps", "num_frames", "nframes", "min_frames", "max_frames")


@dataclass(frozen=True)
class ModalitySettings:
    """One modality's processor settings, as transformers reads them from the checkpoint."""

    min_pixels: int
    max_pixels: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = _OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = _OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = 3  # PIL.Image.BICUBIC

    def __post_init__(self) -> None:
        if self.resample not in _PIL_TO_TORCH_MODE:
            raise ValueError(f"preprocessor resample={self.resample} is not supported (0, 2 or 3)")
        if not 1 <= self.min_pixels <= self.max_pixels:
            raise ValueError(f"preprocessor needs 1 <= min_pixels <= max_pixels, got "
                             f"{self.min_pixels}, {self.max_pixels}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_hf_dict(cls, modality: str, hf: dict, overrides: dict) -> "ModalitySettings":
        """Mirror the HF constructor: `size` (or the class default), then min_pixels / max_pixels."""
        merged = {**hf, **overrides}
        size = dict(merged.get("size") or _DEFAULT_SIZE[modality])
        min_pixels = size.get("shortest_edge") if merged.get("min_pixels") is None else merged["min_pixels"]
        max_pixels = size.get("longest_edge") if merged.get("max_pixels") is None else merged["max_pixels"]
        fields = {k: merged[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor",
                                         "do_rescale", "do_normalize", "resample") if merged.get(k) is not None}
        for key in ("image_mean", "image_std"):
            if merged.get(key) is not None:
                fields[key] = tuple(float(v) for v in merged[key])
        return cls(min_pixels=int(min_pixels), max_pixels=int(max_pixels), **fields)

    def hash_fields(self) -> dict[str, Any]:
        return {"mean": list(self.image_mean), "std": list(self.image_std), "rescale": self.rescale_factor,
                "do_rescale": self.do_rescale, "do_normalize": self.do_normalize,
                "patch": [self.patch_size, self.temporal_patch_size, self.merge_size]}

    def rescale_and_normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [F, C, H, W] -> float32, with the exact arithmetic of HF's fused path:
        (x - mean / rescale_factor) / (std / rescale_factor)."""
        pixels = frames.to(torch.float32)
        if self.do_normalize:
            scale = 1.0 / self.rescale_factor if self.do_rescale else 1.0
            mean = channel_constants(self.image_mean, frames.device) * scale
            std = channel_constants(self.image_std, frames.device) * scale
            return pixels.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        return pixels * self.rescale_factor if self.do_rescale else pixels


@dataclass(frozen=True)
class Qwen2VLProcessingConfig:
    image: ModalitySettings
    video: ModalitySettings
    image_token_id: int
    video_token_id: int
    cap_pixels_per_frame: bool = False  # transformers' video option (qwen-vl-utils' total budget)
    max_video_tokens: int = 128000
    # Server-wide frame-sampling defaults from --mm-processor-kwargs (fps, num_frames, ...).
    video_sampling_defaults: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_pretrained(cls, model_dir: str, hf_config: Any,
                        mm_processor_kwargs: dict | None = None) -> "Qwen2VLProcessingConfig":
        """Read the checkpoint's processor files the way transformers' Auto classes do and apply the
        server's --mm-processor-kwargs on top (they reach both image and video, as in HF)."""
        server = dict(mm_processor_kwargs or {})
        unknown = set(server) - set(_SERVER_KEYS)
        if unknown:
            raise ValueError(f"--mm-processor-kwargs: unsupported key(s) {sorted(unknown)} for Qwen2-VL "
                             f"(supported: {', '.join(_SERVER_KEYS)})")
        image_dict, video_dict = _read_processor_dicts(model_dir)
        pixel_overrides = {k: server[k] for k in ("min_pixels", "max_pixels", "size") if k in server}
        return cls(
            image=ModalitySettings.from_hf_dict(IMAGE, image_dict, pixel_overrides),
            video=ModalitySettings.from_hf_dict(VIDEO, video_dict, pixel_overrides),
            image_token_id=_config_int(hf_config, "image_token_id"),
            video_token_id=_config_int(hf_config, "video_token_id"),
            cap_pixels_per_frame=bool(server.get("cap_pixels_per_frame", video_dict.get("cap_pixels_per_frame"))),
            max_video_tokens=int(server.get("max_video_tokens", video_dict.get("max_video_tokens") or 128000)),
            video_sampling_defaults=tuple((k, server[k]) for k in _VIDEO_SAMPLING_KEYS if k in server))


def _read_processor_dicts(model_dir: str) -> tuple[dict, dict]:
    """(image dict, video dict), by transformers' priority: processor_config.json's nested entry,
    then video_preprocessor_config.json (video only), then preprocessor_config.json."""
    def load(name: str) -> dict | None:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    nested = load("processor_config.json") or {}
    legacy = load("preprocessor_config.json") or {}
    image_dict = nested.get("image_processor") or legacy
    video_dict = nested.get("video_processor") or load("video_preprocessor_config.json") or legacy
    return image_dict, video_dict


def _config_int(hf_config: Any, name: str) -> int:
    value = hf_config.get(name) if isinstance(hf_config, dict) else getattr(hf_config, name, None)
    if value is None:
        raise ValueError(f"the model config has no {name}; cannot place media tokens")
    return int(value)


def resize_frames(frames: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """[F, H, W, 3] uint8 -> [F, height, width, 3] uint8 through the very call torchvision's
    `resize` makes for HF on CPU (antialiased; native uint8 kernel where torchvision uses it)."""
    if frames.shape[1:3] == (height, width):
        return frames  # torchvision returns the input unchanged too
    mode = _PIL_TO_TORCH_MODE[resample]
    if not frames.flags.writeable:  # e.g. np.asarray(PIL image); torch wants a writable buffer
        frames = frames.copy()
    images = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()  # [F, 3, H, W]
    native_uint8 = mode == "nearest-exact" or mode == "bicubic" or (mode == "bilinear" and _native_bilinear())
    antialias = mode != "nearest-exact"
    align_corners = None if mode == "nearest-exact" else False
    pixels = images if native_uint8 else images.to(torch.float32)
    out = torch.nn.functional.interpolate(pixels, size=[height, width], mode=mode,
                                          align_corners=align_corners, antialias=antialias)
    if not native_uint8:
        out = out.round_().to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous().numpy()


def _native_bilinear() -> bool:
    return (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
            or platform.machine() in ("aarch64", "arm64"))


class Qwen2VLProcessor:
    """One per served model; stateless after construction (safe to share across requests)."""

    def __init__(self, config: Qwen2VLProcessingConfig):
        self.config = config

    @classmethod
    def from_pretrained(cls, model_dir: str, hf_config: Any,
                        mm_processor_kwargs: dict | None = None) -> "Qwen2VLProcessor":
        return cls(Qwen2VLProcessingConfig.from_pretrained(model_dir, hf_config, mm_processor_kwargs))

    # ---- CPU half ----------------------------------------------------------------------------

    def process_image(self, image: Image.Image, mm_kwargs: dict | None = None, detail: str | None = None,
                      uuid: str | None = None) -> ProcessedMedia:
        settings = self.config.image
        min_pixels, max_pixels = self._pixel_bounds(settings, mm_kwargs, detail)
        if image.mode != "RGB":
            raise ValueError(f"process_image expects an RGB image (vision.image.decode_image), got {image.mode}")
        frames = np.asarray(image, dtype=np.uint8)[None]  # [1, H, W, 3]
        height, width = smart_resize(image.height, image.width, settings.factor, min_pixels, max_pixels)
        frames = resize_frames(frames, height, width, settings.resample)
        grid_thw = (1, height // settings.patch_size, width // settings.patch_size)
        return self._processed(IMAGE, frames, grid_thw, 0.0, (min_pixels, max_pixels), uuid)

    def process_video(self, frames: np.ndarray, fps: float, mm_kwargs: dict | None = None,
                      uuid: str | None = None, metadata: VideoFrames | None = None) -> ProcessedMedia:
        """frames: [T, H, W, 3] uint8, already sampled (vision.video); fps: their rate. `metadata`
        (source frame numbers and rate) is not needed here: time enters M-RoPE through fps."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) < 1:
            raise ValueError(f"video frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        if not fps > 0:
            raise ValueError(f"video fps must be positive, got {fps}")
        settings = self.config.video
        min_pixels, max_pixels = self._pixel_bounds(settings, mm_kwargs, None)
        max_pixels = self._video_frame_cap(len(frames), min_pixels, max_pixels)
        num_frames, src_height, src_width = frames.shape[:3]
        height, width = smart_resize(src_height, src_width, settings.factor, min_pixels, max_pixels)
        frames = resize_frames(frames, height, width, settings.resample)
        grid_t = -(-num_frames // settings.temporal_patch_size)
        grid_thw = (grid_t, height // settings.patch_size, width // settings.patch_size)
        second_per_grid_t = settings.temporal_patch_size / fps
        return self._processed(VIDEO, frames, grid_thw, second_per_grid_t, (min_pixels, max_pixels), uuid)

    def num_tokens_for_size(self, modality: str, height: int, width: int, num_frames: int = 1,
                            mm_kwargs: dict | None = None, detail: str | None = None) -> int:
        """Placeholder tokens for an item of this source size (from its header, before decoding)."""
        settings = self._settings(modality)
        min_pixels, max_pixels = self._pixel_bounds(settings, mm_kwargs, detail if modality == IMAGE else None)
        if modality == VIDEO:
            max_pixels = self._video_frame_cap(num_frames, min_pixels, max_pixels)
        resized_height, resized_width = smart_resize(height, width, settings.factor, min_pixels, max_pixels)
        grid_t = 1 if modality == IMAGE else -(-num_frames // settings.temporal_patch_size)
        num_patches = grid_t * (resized_height // settings.patch_size) * (resized_width // settings.patch_size)
        return num_patches // settings.merge_size**2

    def video_sampling_kwargs(self, mm_kwargs: dict | None) -> dict[str, Any]:
        """The frame-sampling part of mm_kwargs, as `vision.video.decode_video` keyword arguments."""
        return video_sampling_kwargs(dict(self.config.video_sampling_defaults), mm_kwargs)

    def expand_placeholders(self, prompt_token_ids: list[int],
                            media: list[ProcessedMedia]) -> tuple[list[int], list[PlaceholderRange]]:
        """Replace the k-th <|image_pad|>/<|video_pad|> token with media[k].num_tokens copies of it."""
        pad_ids = {IMAGE: self.config.image_token_id, VIDEO: self.config.video_token_id}
        modality_of = {token_id: modality for modality, token_id in pad_ids.items()}
        slots = [(pos, modality_of[tok]) for pos, tok in enumerate(prompt_token_ids) if tok in modality_of]
        if [m for _, m in slots] != [item.modality for item in media]:
            raise ValueError(_placeholder_mismatch([m for _, m in slots], [item.modality for item in media]))
        expanded: list[int] = []
        ranges: list[PlaceholderRange] = []
        start = 0
        for (pos, modality), item in zip(slots, media):
            expanded.extend(prompt_token_ids[start:pos])
            ranges.append(PlaceholderRange(offset=len(expanded), length=item.num_tokens))
            expanded.extend(item.placeholder_ids or [pad_ids[modality]] * item.num_tokens)
            start = pos + 1
        expanded.extend(prompt_token_ids[start:])
        return expanded, ranges

    # ---- device half -------------------------------------------------------------------------

    def pixel_values_from_frames(self, frames: torch.Tensor, item: MultiModalItem,
                                 dtype: torch.dtype) -> torch.Tensor:
        """frames: [F, H, W, 3] uint8 on any device -> [t*h*w, C*temporal_patch*patch*patch] in `dtype`."""
        settings = self._settings(item.modality)
        pixels = settings.rescale_and_normalize(frames.permute(0, 3, 1, 2))  # [F, 3, H, W] float32
        patches = _patchify(pixels, settings)
        if tuple(item.grid_thw) != patches.grid_thw:
            raise ValueError(f"frames of shape {list(frames.shape)} give grid {patches.grid_thw}, "
                             f"item says {tuple(item.grid_thw)}")
        return patches.values.to(dtype)

    # ---- helpers -------------------------------------------------------------------------------

    def _settings(self, modality: str) -> ModalitySettings:
        if modality not in (IMAGE, VIDEO):
            raise ValueError(f"unsupported modality {modality!r}")
        return self.config.image if modality == IMAGE else self.config.video

    def _pixel_bounds(self, settings: ModalitySettings, mm_kwargs: dict | None,
                      detail: str | None) -> tuple[int, int]:
        """Effective (min_pixels, max_pixels): server settings, then the request's mm_kwargs
        (never above the server's max_pixels), then `detail="low"` (at most LOW_DETAIL_MAX_PIXELS)."""
        if detail not in _DETAILS:
            raise ValueError(f"detail must be one of 'auto', 'high' or 'low', got {detail!r}")
        min_pixels, max_pixels = _requested_pixels(mm_kwargs or {}, settings.min_pixels, settings.max_pixels)
        if max_pixels > settings.max_pixels:
            raise ValueError(f"mm_processor_kwargs max_pixels must be at most {settings.max_pixels} "
                             f"on this server, got {max_pixels}")
        if detail == "low":
            max_pixels = min(max_pixels, LOW_DETAIL_MAX_PIXELS)
            min_pixels = min(min_pixels, max_pixels)
        if not 1 <= min_pixels <= max_pixels:
            raise ValueError(f"mm_processor_kwargs needs 1 <= min_pixels <= max_pixels, "
                             f"got min_pixels={min_pixels}, max_pixels={max_pixels}")
        return min_pixels, max_pixels

    def _video_frame_cap(self, num_frames: int, min_pixels: int, max_pixels: int) -> int:
        """transformers' `cap_pixels_per_frame` (qwen-vl-utils' total-pixel budget), when enabled."""
        if not self.config.cap_pixels_per_frame:
            return max_pixels
        factor = self.config.video.factor
        total_pixels = int(self.config.max_video_tokens * factor * factor * 0.9)
        temporal = self.config.video.temporal_patch_size
        return max(min(max_pixels, total_pixels * temporal // num_frames), int(min_pixels * 1.05))

    def _processed(self, modality: str, frames: np.ndarray, grid_thw: tuple[int, int, int],
                   second_per_grid_t: float, pixel_bounds: tuple[int, int], uuid: str | None) -> ProcessedMedia:
        settings = self._settings(modality)
        num_tokens = grid_thw[0] * grid_thw[1] * grid_thw[2] // settings.merge_size**2
        hash_settings = {"processor": "qwen2_vl", "modality": modality, **settings.hash_fields(),
                         "pixel_bounds": list(pixel_bounds), "second_per_grid_t": second_per_grid_t}
        return ProcessedMedia(modality=modality, frames=frames, grid_thw=grid_thw, num_tokens=num_tokens,
                              second_per_grid_t=second_per_grid_t,
                              mm_hash=mm_hash(frames if uuid is None else None, hash_settings, uuid))


class _Patches:
    def __init__(self, values: torch.Tensor, grid_thw: tuple[int, int, int]):
        self.values, self.grid_thw = values, grid_thw


def _patchify(pixels: torch.Tensor, settings: ModalitySettings) -> _Patches:
    """pixels [F, C, H, W] -> [grid_t*grid_h*grid_w, C*tp*p*p] in HF's layout (module docstring)."""
    tp, patch, merge = settings.temporal_patch_size, settings.patch_size, settings.merge_size
    if pad := -pixels.shape[0] % tp:  # repeat the last frame (an image: itself) up to tp
        pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)], dim=0)
    num_frames, channels, height, width = pixels.shape
    grid_t, grid_h, grid_w = num_frames // tp, height // patch, width // patch
    patches = pixels.reshape(grid_t, tp, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    # -> [grid_t, gh/m, gw/m, m, m, C, tp, p, p]
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    values = patches.reshape(grid_t * grid_h * grid_w, channels * tp * patch * patch)
    return _Patches(values, (grid_t, grid_h, grid_w))


def _requested_pixels(mm_kwargs: dict, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    unknown = set(mm_kwargs) - set(_PIXEL_KEYS) - set(_VIDEO_SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"unsupported mm_processor_kwargs {sorted(unknown)} "
                         f"(supported: {', '.join(_PIXEL_KEYS + _VIDEO_SAMPLING_KEYS)})")
    size = mm_kwargs.get("size") or {}
    if not isinstance(size, dict) or set(size) - {"shortest_edge", "longest_edge"}:
        raise ValueError("mm_processor_kwargs size must be an object with shortest_edge / longest_edge")
    min_pixels = _int_kwarg("min_pixels", mm_kwargs.get("min_pixels", size.get("shortest_edge", min_pixels)))
    max_pixels = _int_kwarg("max_pixels", mm_kwargs.get("max_pixels", size.get("longest_edge", max_pixels)))
    return min_pixels, max_pixels


def _int_kwarg(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ValueError(f"mm_processor_kwargs {name} must be an integer, got {value!r}")
    return int(value)


def _placeholder_mismatch(in_prompt: list[str], given: list[str]) -> str:
    def count(kinds: list[str]) -> str:
        return ", ".join(f"{kinds.count(m)} {m}(s)" for m in (IMAGE, VIDEO))
    if sorted(in_prompt) == sorted(given):
        return "the media items are not in the order of their placeholders in the prompt"
    return f"the prompt has placeholders for {count(in_prompt)} but {count(given)} were given"
