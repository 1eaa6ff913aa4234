"""The records that `vision` hands the engine: one processed media item and where its
placeholder tokens sit in the prompt.

They cross the API-process -> engine-process boundary, so they are msgspec Structs and carry
plain bytes, never tensors. Pixels travel as the *resized* uint8 frames (the processor's resize
step ran in the API process, on the CPU); normalisation and patch flattening run later, on the
engine's device, in `vision.processors.*.pixel_values_from_frames`. uint8 after resize is exactly
what transformers' processors hold at that point, so nothing is lost, and the payload is 4x
smaller than float32 pixel values.
"""

from __future__ import annotations

import dataclasses

import msgspec
import numpy as np

IMAGE = "image"
VIDEO = "video"
MODALITIES = (IMAGE, VIDEO)


class PlaceholderRange(msgspec.Struct, frozen=True, array_like=True):
    """Where an item's embeddings go in the prompt.

    Example: prompt ids  [im_start, user, vision_start, pad, pad, pad, pad, vision_end, ...]
                          0         1     2             3    4    5    6    7
    An image of 4 tokens has PlaceholderRange(offset=3, length=4): prompt positions 3..6 are
    replaced by the 4 rows of the item's embedding, in order.
    """

    offset: int
    length: int


class MultiModalItem(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    modality: str  # IMAGE | VIDEO
    # Content hash of the decoded media + the processor settings that shaped it (vision.hashing).
    # Keys the encoder cache and is folded into prefix-cache block hashes.
    mm_hash: str
    placeholder: PlaceholderRange
    # Resized frames, uint8, row-major [num_frames, height, width, 3] (RGB). An image is one frame
    # (Qwen repeats it to temporal_patch_size on the device); an InternVL image is its tiles.
    # In a server's engine-core process this is a read-only 1-D uint8 numpy array over shared memory
    # (engine.shared_frames) instead: readers use only len() and the buffer protocol.
    frames: bytes
    frames_shape: tuple[int, int, int, int]
    # Qwen2-VL family: (t, h, w) in patches before the spatial merge; InternVL: (num_tiles, 1, 1).
    grid_thw: tuple[int, int, int]
    # Videos only: seconds covered by one temporal grid step (temporal_patch_size / fps),
    # needed by M-RoPE (transformers' `second_per_grid_ts`).
    second_per_grid_t: float = 0.0


# ---- API-process side (added by the vision processors; never crosses the process boundary) ----


class MediaError(ValueError):
    """Media that cannot be fetched or decoded. The message is user-facing (HTTP 400): it names
    what is wrong with the input, never an internal path or object repr."""


@dataclasses.dataclass(frozen=True)
class ProcessedMedia:
    """One item after the CPU half of a processor (resize, grid, token count, hash).

    Built by `vision.processors.*.process_image / process_video`; the frontend expands the prompt's
    placeholders with `num_tokens`, then calls `to_item` with the resulting PlaceholderRange.
    """

    modality: str  # IMAGE | VIDEO
    frames: np.ndarray  # [num_frames, height, width, 3] uint8 RGB, resized
    grid_thw: tuple[int, int, int]
    num_tokens: int  # placeholder tokens this item takes in the prompt
    second_per_grid_t: float  # videos: temporal_patch_size / sampled fps; images: 0.0
    mm_hash: str
    # The ids the item's placeholder token expands to, when not num_tokens copies of it (Qwen3-VL
    # videos: "<t seconds>", vision start/end and pads per temporal group).
    placeholder_ids: tuple[int, ...] = ()

    def to_item(self, placeholder: PlaceholderRange) -> MultiModalItem:
        if placeholder.length != self.num_tokens:
            raise ValueError(f"placeholder length {placeholder.length} != {self.num_tokens} tokens of the item")
        frames = np.ascontiguousarray(self.frames, dtype=np.uint8)
        return MultiModalItem(
            modality=self.modality, mm_hash=self.mm_hash, placeholder=placeholder,
            frames=frames_bytes(frames), frames_shape=_four(frames.shape),
            grid_thw=_three(self.grid_thw), second_per_grid_t=float(self.second_per_grid_t))


def frames_bytes(frames: np.ndarray) -> bytes:
    """The raw bytes of C-contiguous uint8 frames [F, H, W, 3]. An image the processor did not
    resize is a read-only view of the `bytes` PIL made for `np.asarray(image)`: that very object is
    returned, not a copy. Why: a 448x448 image is 602 KB of freshly faulted pages per copy, and
    page faults serialise across threads (measured in BENCHMARKS.md, "Building W1's requests")."""
    base = frames.base
    while isinstance(base, np.ndarray):  # np.asarray(image)[None]: a view of the view of the bytes
        base = base.base
    # C-contiguous and as long as the bytes: the view starts at byte 0 and covers them in order.
    if isinstance(base, bytes) and len(base) == frames.nbytes and frames.flags.c_contiguous:
        return base
    return frames.tobytes()


def _four(shape) -> tuple[int, int, int, int]:
    a, b, c, d = (int(n) for n in shape)
    return a, b, c, d


def _three(shape) -> tuple[int, int, int]:
    a, b, c = (int(n) for n in shape)
    return a, b, c
