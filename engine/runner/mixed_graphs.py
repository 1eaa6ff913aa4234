"""CUDA graphs for steps with prompt or vision rows (chunked prefill joined with decodes): the LM
forward captured once per token-count bucket and replayed with the step padded to it. Served image
chat is such steps most of the time, and run eagerly they cost ~400 launches of Python each.

Caller: engine.runner.model_runner (`MixedGraphs.capture()` after the decode graphs, then
`can_replay(batch)` / `replay(...)` on every step that is not pure decode). Off with
DeviceConfig.enforce_eager or DeviceConfig.mixed_graph_max_tokens = 0.

The graphs' attention grid is fixed by padding the request list, not the rows' arithmetic:
  * the step's T tokens are padded to the bucket's B tokens; rows [T, B) form one dummy request
    (number R, right after the step's R requests): KV slot -1 (not written), token 0 / position 0,
    seq_len B - T over the null block 0 (its block-table row is zeroed), output dropped;
  * requests (R, max_num_seqs] after it are empty (query_start_loc = B), so their programs exit.
The paged-attention kernel never splits KV in these graphs (max_query_len > 1); it walks the same
fixed 256-token segments in order that its split mode merges, so every row equals the eager
step's. Linear layers are batch-invariant (deterministic mode) whatever the padded M; without
determinism cuBLAS may pick another algorithm for B rows than for T, as it may between any batches.
The input is inputs_embeds [B, E] for models with a vision tower (the runner embeds and merges
vision rows eagerly first; E = H * (1 + DeepStack layers) for Qwen3-VL) and input_ids [B] otherwise.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)

# Token counts captured: fine steps at the small end (a few decodes + a short chunk), then every 64.
_BUCKET_STEPS = (16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)


def mixed_buckets(max_tokens: int) -> list[int]:
    """The captured token counts up to max_tokens (always including it when it is positive)."""
    if max_tokens <= 0:
        return []
    return sorted({b for b in _BUCKET_STEPS if b < max_tokens} | {max_tokens})


class MixedGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list, max_num_seqs: int, max_model_len: int,
                 block_size: int, uses_mrope: bool, embed_width: int | None, max_tokens: int,
                 dtype: torch.dtype, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = mixed_buckets(max_tokens)
        self.max_model_len = max_model_len
        self.max_reqs = max_num_seqs + 1                  # + the dummy request of the padding rows
        num_tokens, max_blocks = max(self.buckets, default=0), -(-max_model_len // block_size)
        self.input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)            # [B]
        self.inputs_embeds = (torch.zeros(num_tokens, embed_width, dtype=dtype, device=device)
                              if embed_width is not None else None)                           # [B, E]
        self.positions = torch.zeros((3, num_tokens) if uses_mrope else (num_tokens,),
                                     dtype=torch.int64, device=device)                        # [3, B] or [B]
        self.slot_mapping = torch.full((num_tokens,), -1, dtype=torch.int64, device=device)   # [B]
        self.query_start_loc = torch.zeros(self.max_reqs + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(self.max_reqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(self.max_reqs, max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}   # bucket -> hidden [B, H], written by replay

    def _metadata(self, size: int) -> AttentionMetadata:
        # max_query_len > 1: the non-split kernel. On CUDA query_lens_cpu sums to `size` (no row
        # is cleared); elsewhere (tests) the torch reference reads the lengths from the tensors.
        host_lengths = [size] if self.query_start_loc.is_cuda else None
        return AttentionMetadata(
            query_start_loc=self.query_start_loc, seq_lens=self.seq_lens, slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables, max_query_len=max(2, size), max_seq_len=self.max_model_len,
            num_reqs=self.max_reqs, num_actual_tokens=size, query_lens_cpu=host_lengths, seq_lens_cpu=None)

    def _forward(self, size: int) -> torch.Tensor:
        embeds = self.inputs_embeds[:size] if self.inputs_embeds is not None else None
        return self.model(None if embeds is not None else self.input_ids[:size], self.positions[..., :size],
                          self._metadata(size), self.kv_caches, inputs_embeds=embeds)

    def _pad_for_capture(self, size: int) -> None:
        """All rows one dummy request (request 0) over the null block: what replay writes for T = 0."""
        self.query_start_loc.fill_(size)
        self.query_start_loc[0] = 0
        self.seq_lens.zero_()
        self.seq_lens[0] = size
        self.slot_mapping.fill_(-1)

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """Largest bucket first, in the decode graphs' memory pool; one eager warm-up run each."""
        start = time.perf_counter()
        for size in reversed(self.buckets):
            self._pad_for_capture(size)
            self._forward(size)                      # compile outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size], pool = graph, graph.pool()
        torch.cuda.synchronize()
        if self.buckets:
            logger.info("CUDA graphs: captured %d mixed-step token counts (%d..%d) in %.1f s",
                        len(self.buckets), self.buckets[0], self.buckets[-1], time.perf_counter() - start)

    def can_replay(self, attn_metadata: AttentionMetadata) -> bool:
        num_tokens = attn_metadata.num_actual_tokens
        return (bool(self.graphs) and num_tokens <= self.buckets[-1]
                and attn_metadata.num_reqs < self.max_reqs and attn_metadata.max_seq_len <= self.max_model_len)

    def replay(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor | None, positions: torch.Tensor,
               attn_metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids [T] (or inputs_embeds [T, E]), positions [T] or [3, T] -> hidden [T, H]."""
        num_tokens, num_reqs = attn_metadata.num_actual_tokens, attn_metadata.num_reqs
        size = next(b for b in self.buckets if b >= num_tokens)
        if self.inputs_embeds is not None:
            assert inputs_embeds is not None, "a vision model's mixed graph runs on inputs_embeds"
            self.inputs_embeds[:num_tokens].copy_(inputs_embeds, non_blocking=True)
        else:
            self.input_ids[:num_tokens].copy_(input_ids, non_blocking=True)
        self.positions[..., :num_tokens].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_tokens].copy_(attn_metadata.slot_mapping, non_blocking=True)
        self.query_start_loc[:num_reqs + 1].copy_(attn_metadata.query_start_loc, non_blocking=True)
        self.query_start_loc[num_reqs + 1:].fill_(size)            # the dummy request, then empty ones
        self.seq_lens[:num_reqs].copy_(attn_metadata.seq_lens, non_blocking=True)
        self.seq_lens[num_reqs:].zero_()
        self.seq_lens[num_reqs] = size - num_tokens
        width = attn_metadata.block_tables.shape[1]
        self.block_tables[:num_reqs, :width].copy_(attn_metadata.block_tables, non_blocking=True)
        self.block_tables[num_reqs].zero_()                         # the dummy reads the null block
        if size > num_tokens:
            if self.inputs_embeds is not None:
                self.inputs_embeds[num_tokens:size].zero_()
            else:
                self.input_ids[num_tokens:size].zero_()
            self.positions[..., num_tokens:size].zero_()
            self.slot_mapping[num_tokens:size].fill_(-1)
        self.graphs[size].replay()
        return self.outputs[size][:num_tokens]
