"""The vision tower under tensor parallelism, `--mm-encoder-tp-mode data`: every TP rank holds the
whole (small) tower; a step's media items are split across the ranks, each encodes its share and
the embeddings are all-gathered, so every rank ends with every item's rows.

Caller: the VL models' embed_multimodal (engine.models.qwen2_vl) when tp_size > 1.

Items are dealt in order to balance patch counts (greedy: next item to the least-loaded rank).
Every rank computes the same assignment from grid_thw, so the gathered sizes need no exchange.
A tower error on one rank must not leave the others waiting in the gather: each rank gathers an
ok-flag with its rows and all raise together when any failed (the encoder runner then retries
item by item, on every rank alike).
"""

from __future__ import annotations

import torch

from engine.distributed.parallel_context import ParallelContext


def assign_items(num_patches: list[int], tp_size: int) -> list[list[int]]:
    """Item indices per rank, each rank's list in item order."""
    loads = [0] * tp_size
    owned: list[list[int]] = [[] for _ in range(tp_size)]
    for item in sorted(range(len(num_patches)), key=lambda i: (-num_patches[i], i)):
        rank = min(range(tp_size), key=lambda r: (loads[r], r))
        loads[rank] += num_patches[item]
        owned[rank].append(item)
    return [sorted(items) for items in owned]


def encode_data_parallel(tower, pixel_values: torch.Tensor, grid_thw: torch.Tensor, merge_size: int,
                         hidden_size: int, parallel: ParallelContext) -> list[torch.Tensor]:
    """pixel_values [N_patches, patch_dim] of all items, grid_thw [n, 3] -> one [tokens_i, H]
    embedding per item (hidden_size: the tower's output width), in order, identical on every TP rank."""
    patches = grid_thw.prod(dim=-1).tolist()
    tokens = [p // merge_size**2 for p in patches]
    owned = assign_items(patches, parallel.tp_size)
    mine = owned[parallel.tp_rank]
    starts = [0]
    for count in patches:
        starts.append(starts[-1] + count)
    local, ok = _encode_own(tower, pixel_values, grid_thw, starts, mine)
    width = max(sum(tokens[i] for i in items) for items in owned)
    dtype = local.dtype if local is not None else pixel_values.dtype
    padded = torch.zeros(width + 1, hidden_size, dtype=dtype, device=pixel_values.device)
    if local is not None:
        padded[:local.shape[0]] = local
    padded[width, 0] = 1.0 if ok else 0.0                   # last row: this rank's ok-flag
    gathered = parallel.all_gather(padded[None], dim=0)      # [tp, width + 1, H]
    if not bool((gathered[:, width, 0] == 1.0).all()):
        raise RuntimeError("the vision tower failed on a tensor-parallel rank")
    return _unpack(gathered, owned, tokens)


def _encode_own(tower, pixel_values, grid_thw, starts, mine):
    if not mine:
        return None, True
    rows = torch.cat([pixel_values[starts[i]:starts[i + 1]] for i in mine])   # [own patches, patch_dim]
    try:
        return tower(rows, grid_thw[mine]), True                              # [own tokens, H]
    except Exception:  # every rank must reach the gather; the error is raised there on all
        return None, False


def _unpack(gathered: torch.Tensor, owned: list[list[int]], tokens: list[int]) -> list[torch.Tensor]:
    result: list[torch.Tensor | None] = [None] * len(tokens)
    for rank, items in enumerate(owned):
        row = 0
        for item in items:
            result[item] = gathered[rank, row:row + tokens[item]]
            row += tokens[item]
    return result

