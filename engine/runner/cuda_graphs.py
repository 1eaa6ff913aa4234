"""CUDA graphs for pure-decode steps: the model forward captured once per batch-size bucket and
replayed with the step's inputs copied into static buffers (one launch instead of ~400).

Caller: engine.runner.model_runner (`DecodeGraphs.capture()` after the KV cache exists, then
`can_replay(batch)` / `replay(batch)` every step). Off with DeviceConfig.enforce_eager.

A step replays when every request decodes exactly one output token (no prompt or vision rows), it
fits the largest bucket and its longest sequence fits `max_seq_len` (the graphs' attention grid
is sized for it). A batch of n requests runs in the smallest bucket b >= n; rows [n, b) are
padding: slot -1 (the KV write skips them), seq_len 1 over the null block 0, token 0, position 0.
Their hidden rows are computed and dropped. Attention uses fixed split sizes, so a row's result
does not depend on the bucket or on whether the step replays or runs eagerly.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)

# Longest sequence a replayed step may hold: the split-KV grid grows with it, and a grid sized for
# 128k-token contexts would launch mostly-idle programs on every decode step. Longer decodes run eagerly.
MAX_GRAPH_SEQ_LEN = 8192


def decode_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 (as vLLM), capped at and always including max_num_seqs."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs] + list(range(8, max_num_seqs, 8)) + [max_num_seqs]
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list, max_num_seqs: int, max_model_len: int,
                 block_size: int, uses_mrope: bool, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = decode_buckets(max_num_seqs)
        self.max_seq_len = min(max_model_len, MAX_GRAPH_SEQ_LEN)
        max_batch, max_blocks = self.buckets[-1], -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)             # [B]
        self.positions = torch.zeros((3, max_batch) if uses_mrope else (max_batch,),
                                     dtype=torch.int64, device=device)                        # [3, B] or [B]
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)    # [B]
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)  # [B + 1]
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)               # [B]
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}   # bucket -> hidden [b, H], written by replay
        self.pool: object | None = None   # the graphs' shared memory pool (the mixed-step graphs join it)

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[:size + 1], seq_lens=self.seq_lens[:size],
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            max_query_len=1, max_seq_len=self.max_seq_len, num_reqs=size, num_actual_tokens=size,
            query_lens_cpu=[1] * size, seq_lens_cpu=None)

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[..., :size], self._metadata(size),
                          self.kv_caches)

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest bucket first, all sharing one memory pool; one eager warm-up run each."""
        start, pool = time.perf_counter(), None
        for size in reversed(self.buckets):
            self._forward(size)                      # compile / autotune outside the capture
            torch.cuda.synchronize()
            self.graphs[size], self.outputs[size] = self._capture_one(size, pool)
            pool = self.graphs[size].pool()
        self.pool = pool
        torch.cuda.synchronize()
        logger.info("CUDA graphs: captured %d decode batch sizes (1..%d) in %.1f s",
                    len(self.buckets), self.buckets[-1], time.perf_counter() - start)

    def _capture_one(self, size: int, pool):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = self._forward(size)
        return graph, output

    def can_replay(self, attn_metadata: AttentionMetadata) -> bool:
        """Shape check only; the caller checks that every row decodes an output token."""
        return (bool(self.graphs) and attn_metadata.max_query_len == 1
                and attn_metadata.num_reqs <= self.buckets[-1]
                and attn_metadata.max_seq_len <= self.max_seq_len)

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor,
               attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids [n], positions [n] or [3, n] of a pure-decode step -> hidden [n, H]."""
        num_reqs = attn_metadata.num_reqs
        size = next(b for b in self.buckets if b >= num_reqs)
        width = attn_metadata.block_tables.shape[1]
        self.input_ids[:num_reqs].copy_(input_ids, non_blocking=True)
        self.positions[..., :num_reqs].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_reqs].copy_(attn_metadata.slot_mapping, non_blocking=True)
        self.seq_lens[:num_reqs].copy_(attn_metadata.seq_lens, non_blocking=True)
        self.block_tables[:num_reqs, :width].copy_(attn_metadata.block_tables, non_blocking=True)
        if size > num_reqs:    # padding rows: write nothing, attend to one key of the null block
            self.input_ids[num_reqs:size].zero_()
            self.positions[..., num_reqs:size].zero_()
            self.slot_mapping[num_reqs:size].fill_(-1)
            self.seq_lens[num_reqs:size].fill_(1)
            self.block_tables[num_reqs:size, 0].zero_()
        self.graphs[size].replay()
        return self.outputs[size][:num_reqs]
