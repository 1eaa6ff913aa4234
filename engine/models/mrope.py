"""M-RoPE positions for the Qwen2-VL family: transformers' `get_rope_index` semantics, computed
once per request from its prompt and media items (the runner caches the result).

Text tokens advance one position at a time on all three rows (t, h, w). An item's placeholder run
of t*h*w/merge² tokens gets a 3D grid that starts at the running position: the h and w rows count
rows and columns of merged patches, the t row counts temporal steps scaled by `time_interval`
(Qwen2.5-VL videos: tokens_per_second * second_per_grid_t; images and Qwen2-VL: 1). After an item
the running position jumps by max(h, w) / merge.

Example: text "ab", a 1x4x4 image (2x2 merged tokens), text "c" (start 2):
    t: 0 1 | 2 2 2 2 | 4        h: 0 1 | 2 2 3 3 | 4        w: 0 1 | 2 3 2 3 | 4
Decode tokens continue at position index + delta, delta = max(prompt positions) + 1 - prompt_len.

Built with numpy (a new request's table is on the engine's per-step path; small torch ops cost
several times more) and handed over as a torch tensor sharing the array.
"""

from __future__ import annotations

import numpy as np
import torch

from vision.inputs import VIDEO, MultiModalItem


def _item_positions(item: MultiModalItem, start: int, merge: int, tokens_per_second: float | None) -> np.ndarray:
    t, h, w = item.grid_thw
    grid_h, grid_w = h // merge, w // merge
    interval = 1.0
    if item.modality == VIDEO and tokens_per_second is not None:
        interval = tokens_per_second * item.second_per_grid_t
    # float32 product truncated, as transformers' torch.arange(t) * interval (default dtype) .long()
    temporal = (np.arange(t, dtype=np.float32) * np.float32(interval)).astype(np.int64) + start   # [t]
    rows = np.arange(grid_h, dtype=np.int64) + start                                         # [grid_h]
    cols = np.arange(grid_w, dtype=np.int64) + start                                         # [grid_w]
    tt, hh, ww = np.meshgrid(temporal, rows, cols, indexing="ij")
    return np.stack([tt, hh, ww]).reshape(3, -1)              # [3, t*grid_h*grid_w]


def _text_positions(num_tokens: int, position: int) -> np.ndarray:
    return np.broadcast_to(np.arange(position, position + num_tokens, dtype=np.int64), (3, num_tokens))


def mrope_positions(
    num_prompt_tokens: int,
    mm_items: list[MultiModalItem],
    spatial_merge_size: int,
    tokens_per_second: float | None,
) -> tuple[torch.Tensor, int]:
    """Returns (positions [3, num_prompt_tokens] int64, delta for decode positions).

    `tokens_per_second` is None for Qwen2-VL (no temporal scaling), the vision config's value for
    Qwen2.5-VL. Items must be sorted by placeholder offset and not overlap.
    """
    pieces: list[np.ndarray] = []
    cursor = 0  # next prompt index to place
    position = 0  # running text position
    for item in mm_items:
        offset, length = item.placeholder.offset, item.placeholder.length
        if offset < cursor:
            raise ValueError("multimodal placeholders overlap or are not sorted by offset")
        text_len = offset - cursor
        pieces.append(_text_positions(text_len, position))
        position += text_len
        grid = _item_positions(item, position, spatial_merge_size, tokens_per_second)
        if grid.shape[1] != length:
            raise ValueError(f"placeholder of {length} tokens does not match grid {item.grid_thw}")
        pieces.append(grid)
        position += max(item.grid_thw[1], item.grid_thw[2]) // spatial_merge_size
        cursor = offset + length
    pieces.append(_text_positions(num_prompt_tokens - cursor, position))
    positions = np.concatenate(pieces, axis=1)                 # [3, num_prompt_tokens]
    delta = int(positions.max()) + 1 - num_prompt_tokens if num_prompt_tokens else 0
    return torch.from_numpy(positions), delta


def qwen3_vl_mrope_positions(prompt_token_ids: list[int], mm_items: list[MultiModalItem], spatial_merge_size: int,
                             pad_token_ids: dict[str, int]) -> tuple[torch.Tensor, int]:
    """Qwen3-VL (transformers' Qwen3VLModel.get_rope_index): every run of an item's pad tokens is
    one (1, h, w) grid starting at the running position, which then advances by max(h, w) / merge;
    every other token, including a video's "<t seconds>" and vision start/end tokens between its
    temporal groups, is text. A video of t groups holds t runs; time is in the text, not in the t row.

    pad_token_ids: modality -> its pad token id. Returns (positions [3, len(prompt)], decode delta)."""
    pieces: list[np.ndarray] = []
    cursor = position = 0
    for item in mm_items:
        offset, length = item.placeholder.offset, item.placeholder.length
        if offset < cursor:
            raise ValueError("multimodal placeholders overlap or are not sorted by offset")
        span = prompt_token_ids[offset:offset + length]
        runs = _pad_runs(span, pad_token_ids[item.modality])
        t, h, w = item.grid_thw
        grid_h, grid_w = h // spatial_merge_size, w // spatial_merge_size
        num_groups = t if item.modality == VIDEO else 1
        if len(runs) != num_groups or any(end - start != grid_h * grid_w * (t // num_groups) for start, end in runs):
            raise ValueError(f"placeholder of {length} tokens does not match grid {item.grid_thw}")
        local = -(offset - cursor)  # span-relative index of the next token to place
        for start, end in runs:
            pieces.append(_text_positions(start - local, position))
            position += start - local
            group = _item_positions(item, position, spatial_merge_size, None)[:, :end - start]
            pieces.append(group)       # [3, grid_h * grid_w]: the first frame of the grid = one group
            position += max(grid_h, grid_w)
            local = end
        pieces.append(_text_positions(length - local, position))
        position += length - local
        cursor = offset + length
    pieces.append(_text_positions(len(prompt_token_ids) - cursor, position))
    positions = np.concatenate(pieces, axis=1)                 # [3, len(prompt)]
    delta = int(positions.max()) + 1 - len(prompt_token_ids) if prompt_token_ids else 0
    return torch.from_numpy(positions), delta


def _pad_runs(span: list[int], pad_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of pad_token_id in span."""
    runs, start = [], None
    for index, token in enumerate(span + [None]):
        if token == pad_token_id and start is None:
            start = index
        elif token != pad_token_id and start is not None:
            runs.append((start, index))
            start = None
    return runs
