"""InternVL (2.5 and the transformers-native InternVL) media processing: dynamic tiling -> uint8
tiles, placeholder expansion, and (on the engine's device) normalised pixel values.

Caller: `engine.frontend` (process_image / process_video / expand_placeholders / num_tokens_for_size)
and `engine.runner.encoder_runner` (pixel_values_from_frames), through `vision.processors.get_processor`.

Dynamic tiling of an image (both layouts): among the grids (cols, rows) with min..max tiles, pick
the one whose aspect ratio is closest to the image's (ties: the later grid if the image is larger
than half of its canvas), resize the image to (cols*S, rows*S), cut it row-major into S x S tiles and,
if there is more than one tile, append the whole image resized to S x S (the thumbnail):

    800 x 400 image, S=448, max 12 -> grid (2, 1): | tile0 | tile1 | + thumbnail  -> 3 tiles

The two layouts preprocess as their users do, bit for bit:
  hf_native  transformers' GotOcr2ImageProcessor / InternVLVideoProcessor (torchvision backend):
             antialiased uint8 bicubic resize, (x - 255*mean) / (255*std).
  original   OpenGVLab's load_image / dynamic_preprocess: PIL bicubic resize, ToTensor, Normalize
             ((x / 255 - mean) / std), ImageNet mean/std; its set-ordered list of grids.
An item's frames are its tiles [num_tiles, S, S, 3]; grid_thw = (num_tiles, 1, 1).

Prompt: each image placeholder (`<IMG_CONTEXT>` as transformers' chat template writes it, or the text
`<image>` as the InternVL2.5 template writes it) becomes `<img>` + num_image_token * num_tiles x
`<IMG_CONTEXT>` + `</img>`; each `<video>` becomes "Frame1: <img>...</img>\\nFrame2: ..." with one
tile per frame. The PlaceholderRange spans the whole replacement; only its `<IMG_CONTEXT>` rows take
vision embeddings (the model's `embed_token_id`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vision.hashing import mm_hash
from vision.inputs import IMAGE, VIDEO, MultiModalItem, PlaceholderRange, ProcessedMedia
from vision.video import video_sampling_kwargs
from vision.processors import channel_constants
from vision.processors.qwen2_vl import resize_frames

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
_TILE_KWARGS = {"max_dynamic_patch": "max_patches", "max_patches": "max_patches",
                "min_dynamic_patch": "min_patches", "min_patches": "min_patches"}
_VIDEO_SAMPLING_KEYS = ("fps", "num_frames", "nframes", "min_frames", "max_frames")


# ---- grid choice --------------------------------------------------------------------------------

def hf_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """transformers' get_all_supported_aspect_ratios: (cols, rows), by tile count, then (cols, rows)."""
    grids = [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1)
             if min_tiles <= w * h <= max_tiles]
    return sorted(grids, key=lambda g: g[0] * g[1])


def original_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """OpenGVLab's dynamic_preprocess: the same grids, in the iteration order of its Python set."""
    grids = set((i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1)
                for j in range(1, n + 1) if min_tiles <= i * j <= max_tiles)
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, tile: int, grids: list[tuple[int, int]]) -> tuple[int, int]:
    """find_closest_aspect_ratio / get_optimal_tiled_canvas (the two agree given the same grid order)."""
    aspect, area = width / height, width * height
    best_diff, best = float("inf"), (1, 1)
    for grid in grids:
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * tile * tile * grid[0] * grid[1]:
            best = grid
    return best


# ---- settings -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class InternVLProcessingConfig:
    hf_native: bool               # transformers' layout (torchvision) or the original (PIL)
    image_size: int               # S: tile side
    tokens_per_tile: int          # num_image_token
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    dynamic: bool = True          # original `dynamic_image_size` / transformers' `crop_to_patches`
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    video_mean: tuple[float, ...] = IMAGENET_MEAN
    video_std: tuple[float, ...] = IMAGENET_STD
    video_sampling_defaults: tuple[tuple[str, Any], ...] = ()
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"min_dynamic_patch / max_dynamic_patch must satisfy 1 <= min <= max, "
                             f"got {self.min_tiles}, {self.max_tiles}")

    def hash_fields(self) -> dict[str, Any]:
        return {"processor": "internvl", "hf_native": self.hf_native, "size": self.image_size,
                "mean": list(self.image_mean), "std": list(self.image_std)}


def _read_json(model_dir: str, name: str) -> dict:
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _get(config: Any, name: str, default: Any = None) -> Any:
    value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
    return default if value is None else value


def tile_geometry(hf_config: Any) -> tuple[int, int]:
    """(tokens per tile = num_image_token, tile side S) from either layout's config."""
    vision = _get(hf_config, "vision_config")
    image_size = _get(hf_config, "force_image_size") or _get(vision, "image_size")
    patch = _get(vision, "patch_size")
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return int((image_size // patch) * _get(hf_config, "downsample_ratio", 0.5)) ** 2, int(image_size)


def _settings(model_dir: str, hf_config: Any, server_kwargs: dict) -> InternVLProcessingConfig:
    per_tile, image_size = tile_geometry(hf_config)
    architecture = (_get(hf_config, "architectures") or [""])[0]
    sampling = tuple((k, server_kwargs[k]) for k in _VIDEO_SAMPLING_KEYS if k in server_kwargs)
    if architecture == "InternVLChatModel":
        tiles: dict[str, Any] = dict(min_tiles=int(_get(hf_config, "min_dynamic_patch", 1)),
                     max_tiles=int(_get(hf_config, "max_dynamic_patch", 12)))
        tiles.update(_tile_overrides(server_kwargs, tiles))
        return InternVLProcessingConfig(
            hf_native=False, image_size=image_size, tokens_per_tile=per_tile,
            use_thumbnail=bool(_get(hf_config, "use_thumbnail", True)),
            dynamic=bool(server_kwargs.get("dynamic_image_size", _get(hf_config, "dynamic_image_size", True))),
            video_sampling_defaults=sampling, **tiles)
    nested = _read_json(model_dir, "processor_config.json")
    image = nested.get("image_processor") or _read_json(model_dir, "preprocessor_config.json")
    video = nested.get("video_processor") or _read_json(model_dir, "video_preprocessor_config.json") or image
    seq_length = nested.get("image_seq_length", per_tile)
    if seq_length != per_tile:
        raise ValueError(f"processor image_seq_length={seq_length} disagrees with the model's {per_tile} "
                         f"tokens per tile")
    size = image.get("size") or {}
    if size.get("height", image_size) != image_size or size.get("width", image_size) != image_size:
        raise ValueError(f"preprocessor size {size} differs from the vision tower's {image_size}")
    tiles = dict(min_tiles=int(image.get("min_patches", 1)), max_tiles=int(image.get("max_patches", 12)))
    tiles.update(_tile_overrides(server_kwargs, tiles))
    return InternVLProcessingConfig(
        hf_native=True, image_size=image_size, tokens_per_tile=per_tile,
        image_mean=tuple(image.get("image_mean", IMAGENET_MEAN)), image_std=tuple(image.get("image_std", IMAGENET_STD)),
        video_mean=tuple(video.get("image_mean", IMAGENET_MEAN)), video_std=tuple(video.get("image_std", IMAGENET_STD)),
        rescale_factor=float(image.get("rescale_factor", 1 / 255)), video_sampling_defaults=sampling, **tiles)


def _tile_overrides(mm_kwargs: dict, current: dict) -> dict:
    """mm_processor_kwargs max_dynamic_patch / min_dynamic_patch (or transformers' max_patches /
    min_patches) -> {max_tiles, min_tiles}."""
    out = {}
    for key, kind in _TILE_KWARGS.items():
        if key in mm_kwargs:
            value = mm_kwargs[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"mm_processor_kwargs {key} must be a positive integer, got {value!r}")
            out["max_tiles" if kind == "max_patches" else "min_tiles"] = value
    merged = {**current, **out}
    if merged["min_tiles"] > merged["max_tiles"]:
        raise ValueError(f"mm_processor_kwargs: min_dynamic_patch={merged['min_tiles']} is larger than "
                         f"max_dynamic_patch={merged['max_tiles']}")
    return out


# ---- tiling -------------------------------------------------------------------------------------

def _resize(image: np.ndarray, width: int, height: int, hf_native: bool) -> np.ndarray:
    """[H, W, 3] uint8 -> [height, width, 3]: torchvision's call for transformers, PIL bicubic else."""
    if hf_native:
        return resize_frames(image[None], height, width, resample=3)[0]
    pil = Image.fromarray(image)
    if pil.size == (width, height):
        return image
    return np.asarray(pil.resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)


def tile_image(image: np.ndarray, config: InternVLProcessingConfig, min_tiles: int, max_tiles: int) -> np.ndarray:
    """[H, W, 3] uint8 -> tiles [n, S, S, 3] uint8 (module docstring)."""
    size = config.image_size
    if not config.dynamic:
        return _resize(image, size, size, config.hf_native)[None]
    height, width = image.shape[:2]
    grids = (hf_grids if config.hf_native else original_grids)(min_tiles, max_tiles)
    cols, rows = closest_grid(width, height, size, grids)
    canvas = _resize(image, cols * size, rows * size, config.hf_native)
    tiles = [canvas[r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)]
    if config.use_thumbnail and len(tiles) != 1:
        tiles.append(_resize(image, size, size, config.hf_native))
    return np.ascontiguousarray(np.stack(tiles))


def num_tiles_for_size(height: int, width: int, config: InternVLProcessingConfig,
                       min_tiles: int, max_tiles: int) -> int:
    if not config.dynamic:
        return 1
    grids = (hf_grids if config.hf_native else original_grids)(min_tiles, max_tiles)
    cols, rows = closest_grid(width, height, config.image_size, grids)
    return cols * rows + (1 if config.use_thumbnail and cols * rows != 1 else 0)


# ---- the processor ------------------------------------------------------------------------------

class InternVLProcessor:
    """One per served model; stateless after construction."""

    def __init__(self, config: InternVLProcessingConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.context_id = self._token_id(IMG_CONTEXT)
        self.start_id, self.end_id = self._token_id(IMG_START), self._token_id(IMG_END)
        self.image_placeholders = [[self.context_id], self._encode("<image>")]
        self.video_placeholder = self._encode("<video>")

    @classmethod
    def from_pretrained(cls, model_dir: str, hf_config: Any, mm_processor_kwargs: dict | None = None):
        from transformers import AutoTokenizer

        settings = _settings(model_dir, hf_config, dict(mm_processor_kwargs or {}))
        # never the checkpoint's Python, even for remote-code (original layout) checkpoints
        return cls(settings, AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False))

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token} token; it is not an InternVL tokenizer")
        return int(token_id)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # ---- CPU half ---------------------------------------------------------------------------

    def process_image(self, image: Image.Image, mm_kwargs: dict | None = None, detail: str | None = None,
                      uuid: str | None = None) -> ProcessedMedia:
        if image.mode != "RGB":
            raise ValueError(f"process_image expects an RGB image (vision.image.decode_image), got {image.mode}")
        min_tiles, max_tiles = self._tile_bounds(mm_kwargs, detail)
        tiles = tile_image(np.asarray(image, dtype=np.uint8), self.config, min_tiles, max_tiles)
        return self._processed(IMAGE, tiles, uuid)

    def process_video(self, frames: np.ndarray, fps: float, mm_kwargs: dict | None = None,
                      uuid: str | None = None, metadata: object = None) -> ProcessedMedia:
        """frames [T, H, W, 3] uint8, already sampled: each frame becomes one S x S tile (the
        source metadata is not used: InternVL numbers frames, it does not time them)."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) < 1:
            raise ValueError(f"video frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        self._tile_bounds(mm_kwargs, None)  # validates the kwargs
        size = self.config.image_size
        if self.config.hf_native:
            tiles = resize_frames(np.ascontiguousarray(frames), size, size, resample=3)
        else:
            tiles = np.stack([_resize(frame, size, size, hf_native=False) for frame in frames])
        return self._processed(VIDEO, np.ascontiguousarray(tiles), uuid)

    def num_tokens_for_size(self, modality: str, height: int, width: int, num_frames: int = 1,
                            mm_kwargs: dict | None = None, detail: str | None = None) -> int:
        """Placeholder tokens of an item of this source size (prompt-length admission)."""
        if modality == VIDEO:
            return len(self._video_ids(num_frames))
        min_tiles, max_tiles = self._tile_bounds(mm_kwargs, detail)
        return 2 + self.config.tokens_per_tile * num_tiles_for_size(height, width, self.config, min_tiles, max_tiles)

    def video_sampling_kwargs(self, mm_kwargs: dict | None) -> dict[str, Any]:
        """The frame-sampling part of mm_kwargs, as `vision.video.decode_video` keyword arguments."""
        return video_sampling_kwargs(dict(self.config.video_sampling_defaults), mm_kwargs)

    def _tile_bounds(self, mm_kwargs: dict | None, detail: str | None) -> tuple[int, int]:
        mm_kwargs = dict(mm_kwargs or {})
        unknown = set(mm_kwargs) - set(_TILE_KWARGS) - set(_VIDEO_SAMPLING_KEYS)
        if unknown:
            raise ValueError(f"unsupported mm_processor_kwargs {sorted(unknown)} for InternVL (supported: "
                             f"{', '.join(sorted(set(_TILE_KWARGS) | set(_VIDEO_SAMPLING_KEYS)))})")
        if detail not in (None, "auto", "high", "low"):
            raise ValueError(f"detail must be one of 'auto', 'high' or 'low', got {detail!r}")
        current = {"min_tiles": self.config.min_tiles, "max_tiles": self.config.max_tiles}
        bounds = {**current, **_tile_overrides(mm_kwargs, current)}
        if detail == "low":  # one tile, like OpenAI's low detail
            return 1, 1
        return bounds["min_tiles"], bounds["max_tiles"]

    def _processed(self, modality: str, tiles: np.ndarray, uuid: str | None) -> ProcessedMedia:
        num_tiles = len(tiles)
        tokens_per_tile = self.config.tokens_per_tile
        num_tokens = len(self._video_ids(num_tiles)) if modality == VIDEO else 2 + num_tiles * tokens_per_tile
        settings = {**self.config.hash_fields(), "modality": modality}
        return ProcessedMedia(modality=modality, frames=tiles, grid_thw=(num_tiles, 1, 1), num_tokens=num_tokens,
                              second_per_grid_t=0.0, mm_hash=mm_hash(tiles if uuid is None else None, settings, uuid))

    # ---- prompt ---------------------------------------------------------------------------------

    def _image_ids(self, num_tiles: int) -> list[int]:
        return [self.start_id] + [self.context_id] * (self.config.tokens_per_tile * num_tiles) + [self.end_id]

    def _video_ids(self, num_frames: int) -> list[int]:
        """transformers' replace_video_token: "\\n".join("Frame{i}: <img>ctx...</img>")."""
        ids: list[int] = []
        for i in range(num_frames):
            ids += self._encode(f"{chr(10) if i else ''}Frame{i + 1}: ") + self._image_ids(1)
        return ids

    def expand_placeholders(self, prompt_token_ids: list[int],
                            media: list[ProcessedMedia]) -> tuple[list[int], list[PlaceholderRange]]:
        """Replace the k-th image/video placeholder with media[k]'s tokens (module docstring)."""
        slots = self._find_placeholders(prompt_token_ids)
        if [m for _, _, m, _ in slots] != [item.modality for item in media]:
            raise ValueError(_mismatch([m for _, _, m, _ in slots], [item.modality for item in media]))
        expanded: list[int] = []
        ranges: list[PlaceholderRange] = []
        start = 0
        for (pos, length, modality, tail), item in zip(slots, media):
            expanded.extend(prompt_token_ids[start:pos])
            ids = self._video_ids(item.grid_thw[0]) if modality == VIDEO else self._image_ids(item.grid_thw[0])
            ranges.append(PlaceholderRange(offset=len(expanded), length=len(ids)))
            expanded.extend(ids + tail)
            start = pos + length
        expanded.extend(prompt_token_ids[start:])
        return expanded, ranges

    def _find_placeholders(self, ids: list[int]) -> list[tuple[int, int, str, list[int]]]:
        """(position, length, modality, ids to re-insert after it) of each placeholder, in order."""
        patterns = [(p, IMAGE) for p in self.image_placeholders] + [(self.video_placeholder, VIDEO)]
        found, pos = [], 0
        while pos < len(ids):
            match = next((m for m in (self._match_at(ids, pos, p, kind) for p, kind in patterns) if m), None)
            if match is None:
                pos += 1
                continue
            found.append((pos, *match))
            pos += match[0]
        return found

    def _match_at(self, ids: list[int], pos: int, pattern: list[int], kind: str):
        """A placeholder starting at pos -> (length, kind, tail ids) or None. A multi-token text
        placeholder ("<image>") may end inside a merged token (">\\n"); its rest is re-encoded."""
        if len(pattern) == 1 or ids[pos:pos + len(pattern)] == pattern:
            return (len(pattern), kind, []) if ids[pos:pos + len(pattern)] == pattern else None
        head = pattern[:-1]
        last = pos + len(head)
        if ids[pos:last] != head or last >= len(ids):
            return None
        closing = self.tokenizer.decode(pattern[-1:])
        text = self.tokenizer.decode(ids[last:last + 1])
        if not text.startswith(closing) or text == closing:
            return None
        return len(pattern), kind, self._encode(text[len(closing):])

    # ---- device half ----------------------------------------------------------------------------

    def pixel_values_from_frames(self, frames: torch.Tensor, item: MultiModalItem,
                                 dtype: torch.dtype) -> torch.Tensor:
        """tiles [n, S, S, 3] uint8 on any device -> [n, 3, S, S] in `dtype`, normalised as the layout's
        own preprocessing does (fused 255-scaled mean/std for transformers; /255 then mean/std else)."""
        size = self.config.image_size
        if frames.dim() != 4 or tuple(frames.shape[1:]) != (size, size, 3) or frames.shape[0] != item.grid_thw[0]:
            raise ValueError(f"InternVL tiles must be [{item.grid_thw[0]}, {size}, {size}, 3], "
                             f"got {list(frames.shape)}")
        video = item.modality == VIDEO
        mean = channel_constants(tuple(self.config.video_mean if video else self.config.image_mean), frames.device)
        std = channel_constants(tuple(self.config.video_std if video else self.config.image_std), frames.device)
        pixels = frames.permute(0, 3, 1, 2).to(torch.float32)  # [n, 3, S, S]
        if self.config.hf_native:
            scale = 1.0 / self.config.rescale_factor  # transformers' fused rescale + normalize
            pixels = (pixels - (mean * scale).view(-1, 1, 1)) / (std * scale).view(-1, 1, 1)
        else:
            pixels = (pixels.div(255) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        return pixels.to(dtype)


def _mismatch(in_prompt: list[str], given: list[str]) -> str:
    def count(kinds: list[str]) -> str:
        return ", ".join(f"{kinds.count(m)} {m}(s)" for m in (IMAGE, VIDEO))
    if sorted(in_prompt) == sorted(given):
        return "the media items are not in the order of their placeholders in the prompt"
    return f"the prompt has placeholders for {count(in_prompt)} but {count(given)} were given"
