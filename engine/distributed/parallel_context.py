"""ParallelContext: which share of the model this rank holds, and the collectives over its peers.

Callers: the parallel layers (engine.layers.linear / embedding), the models (which layers a
pipeline stage owns), the model runner, the vision data-parallel helper. There are no globals:
every module that needs to know its rank is handed this record at construction.

Global rank layout (vLLM's): rank = pp_rank * tp_size + tp_rank, so for TP=2, PP=2

    rank:      0     1  |  2     3
    pp_rank:   0     0  |  1     1          tp groups {0,1} {2,3}; pipelines {0,2} {1,3}
    tp_rank:   0     1  |  0     1          rank 3 (last stage, last tp rank) returns the output
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: Any = None   # torch.distributed ProcessGroup of this rank's TP peers (None: tp_size 1)

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_stage_rank(self) -> int:    # same tp_rank, one stage earlier
        return self.rank - self.tp_size

    @property
    def next_stage_rank(self) -> int:
        return self.rank + self.tp_size

    def shard_size(self, total: int, what: str) -> int:
        """total / tp_size, or ValueError naming what does not divide."""
        if total % self.tp_size:
            raise ValueError(f"--tensor-parallel-size: {self.tp_size} does not divide {what} ({total})")
        return total // self.tp_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group (in place); identity on one rank."""
        if self.tp_size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.tp_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every TP rank's x (same shape on all ranks) along dim, in rank order."""
        if self.tp_size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=dim)


SINGLE_RANK = ParallelContext()


def layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """[start, end) of the decoder layers pipeline stage pp_rank owns; the first
    num_layers % pp_size stages get one layer more."""
    if num_layers < pp_size:
        raise ValueError(f"--pipeline-parallel-size: {pp_size} stages need at least as many layers "
                         f"(the model has {num_layers})")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def kv_heads_of_rank(num_kv_heads: int, parallel: ParallelContext) -> tuple[int, int]:
    """(first KV head, number of KV heads) this TP rank holds. With more ranks than KV heads each
    rank holds one head, replicated over tp_size / num_kv_heads consecutive ranks, which is the
    head its query heads use: rank r's query heads [r*Hq/tp, (r+1)*Hq/tp) all map to KV head
    r // (tp / Hkv) under GQA (query head h uses KV head h // (Hq / Hkv))."""
    tp = parallel.tp_size
    if tp <= num_kv_heads:
        per_rank = parallel.shard_size(num_kv_heads, "num_key_value_heads")
        return parallel.tp_rank * per_rank, per_rank
    if tp % num_kv_heads:
        raise ValueError(f"--tensor-parallel-size: {tp} is larger than the model's {num_kv_heads} KV heads "
                         f"and not a multiple of them")
    return parallel.tp_rank // (tp // num_kv_heads), 1
