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
"""

from __future__ import annotations

import torch

from vision.inputs import VIDEO, MultiModalItem


def _item_positions(item: MultiModalItem, start: int, merge: int, tokens_per_second: float | None) -> torch.Tensor:
    t, h, w = item.grid_thw
    grid_h, grid_w = h // merge, w // merge
    interval = 1.0
    if item.modality == VIDEO and tokens_per_second is not None:
        interval = tokens_per_second * item.second_per_grid_t
    temporal = (torch.arange(t) * interval).long() + start      # [t]
    rows = torch.arange(grid_h) + start                          # [grid_h]
    cols = torch.arange(grid_w) + start                          # [grid_w]
    tt, hh, ww = torch.meshgrid(temporal, rows, cols, indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1)              # [3, t*grid_h*grid_w]


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
    pieces: list[torch.Tensor] = []
    cursor = 0  # next prompt index to place
    position = 0  # running text position
    for item in mm_items:
        offset, length = item.placeholder.offset, item.placeholder.length
        if offset < cursor:
            raise ValueError("multimodal placeholders overlap or are not sorted by offset")
        text_len = offset - cursor
        pieces.append(torch.arange(text_len).expand(3, -1) + position)
        position += text_len
        grid = _item_positions(item, position, spatial_merge_size, tokens_per_second)
        if grid.shape[1] != length:
            raise ValueError(f"placeholder of {length} tokens does not match grid {item.grid_thw}")
        pieces.append(grid)
        position += max(item.grid_thw[1], item.grid_thw[2]) // spatial_merge_size
        cursor = offset + length
    pieces.append(torch.arange(num_prompt_tokens - cursor).expand(3, -1) + position)
    positions = torch.cat(pieces, dim=1)
    delta = int(positions.max()) + 1 - num_prompt_tokens if num_prompt_tokens else 0
    return positions, delta
