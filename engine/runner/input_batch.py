"""Persistent per-request state of the model runner, and the flattened ragged batch of one step.

Caller: engine.runner.model_runner. `InputBatch.update(scheduler_output)` applies the scheduler's
diff (new / resumed requests, cached requests' new blocks and computed counts, finished ids);
`prepare(scheduler_output)` builds the step's tensors; `append_sampled` records what was sampled
(the scheduler does not send sampled tokens back: the runner keeps its own copy).

One step, requests in scheduling order, each computing tokens [num_computed, num_computed + n):

    input_ids        [a0 a1 a2 a3 | b7 | c0 c1]      (req a: prefill chunk, b: decode, c: prefill)
    query_start_loc  [0,            4,   5,    7]
    seq_lens         [4,            8,   2]
    slot_mapping     slot(p) = block_ids[p // block_size] * block_size + p % block_size
    logits_indices   rows whose hidden state samples: the last row of each request whose
                     prompt (plus recomputed outputs) is complete after this step
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.layers.attention import AttentionMetadata
from engine.sampler import SamplingBatch, seed_key
from engine.sampling_params import SamplingParams
from engine.scheduler_output import NewRequestData, SchedulerOutput
from vision.inputs import MultiModalItem


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    mm_items: list[MultiModalItem] = field(default_factory=list)
    # M-RoPE models: prompt positions [3, num_prompt_tokens] and the offset of later positions.
    mrope_positions: torch.Tensor | None = None
    mrope_delta: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:   # decode: no copy of the whole sequence per step
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]


@dataclass
class StepBatch:
    req_ids: list[str]                      # batch order
    num_scheduled_tokens: list[int]         # per request
    input_ids: torch.Tensor                 # [T] int64
    positions: torch.Tensor                 # [T] int64, or [3, T] for M-RoPE models
    attn_metadata: AttentionMetadata
    sampling_req_ids: list[str]             # requests that sample a token this step
    logits_indices: torch.Tensor            # [S] int64, their last-token rows
    sampling: SamplingBatch | None
    # req_id -> (first row, prompt token ids the rows predict, emits None for position 0 first)
    prompt_logprob_rows: dict[str, tuple[int, list[int], bool]] = field(default_factory=dict)


class InputBatch:
    def __init__(self, block_size: int, device: torch.device, vocab_size: int,
                 eos_token_ids: tuple[int, ...] = (), default_seed: int = 0, uses_mrope: bool = False):
        self.block_size = block_size
        self.device = device
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.default_seed = default_seed
        self.uses_mrope = uses_mrope
        self.requests: dict[str, CachedRequestState] = {}

    # --- state updates -----------------------------------------------------------------------

    def update(self, scheduler_output: SchedulerOutput) -> list[NewRequestData]:
        """Apply the scheduler's diff; returns the new requests (the runner may add M-RoPE
        positions or encoder state to them)."""
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in scheduler_output.scheduled_new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id, prompt_token_ids=list(new.prompt_token_ids),
                output_token_ids=list(new.output_token_ids), sampling_params=new.sampling_params,
                block_ids=list(new.block_ids), num_computed_tokens=new.num_computed_tokens,
                mm_items=list(new.mm_items))
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, new_block_ids, num_computed in zip(cached.req_ids, cached.new_block_ids,
                                                       cached.num_computed_tokens):
            state = self.requests[req_id]
            state.block_ids.extend(new_block_ids)
            state.num_computed_tokens = num_computed
        return scheduler_output.scheduled_new_reqs

    def append_sampled(self, req_ids: list[str], sampled_token_ids: list[list[int]]) -> None:
        for req_id, tokens in zip(req_ids, sampled_token_ids):
            self.requests[req_id].output_token_ids.extend(tokens)

    # --- one step's tensors ------------------------------------------------------------------

    def prepare(self, scheduler_output: SchedulerOutput) -> StepBatch:
        req_ids = list(scheduler_output.num_scheduled_tokens)
        counts = [scheduler_output.num_scheduled_tokens[r] for r in req_ids]
        input_ids, positions, slots, seq_lens = [], [], [], []
        sampling_req_ids, logits_indices, prompt_rows = [], [], {}
        for req_id, num_new in zip(req_ids, counts):
            state = self.requests[req_id]
            start, end = state.num_computed_tokens, state.num_computed_tokens + num_new
            if end > state.num_tokens:
                raise ValueError(f"request {req_id}: scheduled up to token {end} but only "
                                 f"{state.num_tokens} are known")
            first_row = len(input_ids)
            input_ids += state.token_ids(start, end)
            positions.append(self._positions(state, start, end))   # np.ndarray [n] or [3, n]
            slots += self._slots(state, start, end)
            seq_lens.append(end)
            if end == state.num_tokens:
                sampling_req_ids.append(req_id)
                logits_indices.append(first_row + num_new - 1)
            if state.sampling_params.prompt_logprobs is not None and start < len(state.prompt_token_ids):
                prompt_rows[req_id] = self._prompt_logprob_targets(state, start, end, first_row)
        return StepBatch(
            req_ids=req_ids, num_scheduled_tokens=counts,
            input_ids=self._to_device(input_ids, torch.int64),
            positions=torch.from_numpy(np.concatenate(positions, axis=-1)).to(self.device, non_blocking=True),
            attn_metadata=self._attn_metadata(req_ids, counts, slots, seq_lens),
            sampling_req_ids=sampling_req_ids, logits_indices=self._to_device(logits_indices, torch.int64),
            sampling=self.sampling_batch(sampling_req_ids) if sampling_req_ids else None,
            prompt_logprob_rows=prompt_rows)

    @staticmethod
    def _positions(state: CachedRequestState, start: int, end: int) -> np.ndarray:
        """numpy (a few µs per request; this runs for every request of every step)."""
        if state.mrope_positions is None:
            return np.arange(start, end, dtype=np.int64)                       # [n]
        num_prompt = state.mrope_positions.shape[1]
        later = np.arange(max(start, num_prompt), max(end, num_prompt), dtype=np.int64) + state.mrope_delta
        if start >= num_prompt:                                                 # decode: output positions only
            return np.broadcast_to(later, (3, later.shape[0]))                  # [3, n]
        in_prompt = state.mrope_positions[:, start:min(end, num_prompt)].numpy()  # [3, n_prompt]
        return np.concatenate([in_prompt, np.broadcast_to(later, (3, later.shape[0]))], axis=1)  # [3, n]

    def _slots(self, state: CachedRequestState, start: int, end: int) -> list[int]:
        size, blocks = self.block_size, state.block_ids
        if (end + size - 1) // size > len(blocks):
            raise ValueError(f"request {state.req_id}: {len(blocks)} blocks cannot hold {end} tokens")
        return [blocks[p // size] * size + p % size for p in range(start, end)]

    @staticmethod
    def _prompt_logprob_targets(state: CachedRequestState, start: int, end: int, first_row: int):
        """Row p (position p) predicts prompt token p + 1: rows [start, min(end, P - 1))."""
        targets = state.prompt_token_ids[start + 1:min(end, len(state.prompt_token_ids) - 1) + 1]
        return first_row, targets, start == 0

    def _attn_metadata(self, req_ids, counts, slots, seq_lens) -> AttentionMetadata:
        tables = [self.requests[r].block_ids for r in req_ids]
        width = max(len(t) for t in tables)
        block_tables = [t + [0] * (width - len(t)) for t in tables]
        query_start_loc = [0]
        for n in counts:
            query_start_loc.append(query_start_loc[-1] + n)
        return AttentionMetadata(
            query_start_loc=self._to_device(query_start_loc, torch.int32),
            seq_lens=self._to_device(seq_lens, torch.int32),
            slot_mapping=self._to_device(slots, torch.int64),
            block_tables=self._to_device(block_tables, torch.int32),
            max_query_len=max(counts), max_seq_len=max(seq_lens), num_reqs=len(req_ids),
            num_actual_tokens=query_start_loc[-1], query_lens_cpu=list(counts), seq_lens_cpu=list(seq_lens))

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    # --- sampling settings -------------------------------------------------------------------

    def sampling_batch(self, req_ids: list[str]) -> SamplingBatch:
        states = [self.requests[r] for r in req_ids]
        params = [s.sampling_params for s in states]
        batch = SamplingBatch(
            temperature=self._floats([p.temperature for p in params]),
            seed_keys=self._to_device([seed_key(self._seed(s), len(s.output_token_ids)) for s in states],
                                      torch.int64),
            all_greedy=all(p.is_greedy for p in params))
        if any(p.effective_top_k for p in params):
            batch.top_k = self._to_device([p.effective_top_k or self.vocab_size for p in params], torch.int64)
        if any(p.top_p < 1.0 for p in params):
            batch.top_p = self._floats([p.top_p for p in params])
        if any(p.min_p > 0.0 for p in params):
            batch.min_p = self._floats([p.min_p for p in params])
        self._add_penalties(batch, states)
        batch.banned_token_ids = self._banned_tokens(states)
        requested = [p.logprobs for p in params if p.logprobs is not None]
        batch.max_num_logprobs = max(requested) if requested else None
        return batch

    def _seed(self, state: CachedRequestState) -> int:
        seed = state.sampling_params.seed
        # Unseeded (the frontend normally assigns one): derive it from the request id.
        return seed if seed is not None else zlib.crc32(state.req_id.encode()) ^ self.default_seed

    def _add_penalties(self, batch: SamplingBatch, states: list[CachedRequestState]) -> None:
        params = [s.sampling_params for s in states]
        if any(p.repetition_penalty != 1.0 for p in params):
            batch.repetition_penalty = self._floats([p.repetition_penalty for p in params])
            batch.prompt_token_ids = self._padded([s.prompt_token_ids for s in states])
        if any(p.frequency_penalty != 0.0 for p in params):
            batch.frequency_penalty = self._floats([p.frequency_penalty for p in params])
        if any(p.presence_penalty != 0.0 for p in params):
            batch.presence_penalty = self._floats([p.presence_penalty for p in params])
        if batch.repetition_penalty is not None or batch.frequency_penalty is not None \
                or batch.presence_penalty is not None:
            batch.output_token_ids = self._padded([s.output_token_ids for s in states])

    def _banned_tokens(self, states: list[CachedRequestState]) -> torch.Tensor | None:
        """min_tokens: EOS (unless ignore_eos) and stop_token_ids cannot be sampled before it."""
        banned = []
        for state in states:
            params = state.sampling_params
            ids = []
            if len(state.output_token_ids) < params.min_tokens:
                ids = list(params.stop_token_ids or []) + ([] if params.ignore_eos else list(self.eos_token_ids))
            banned.append([i for i in ids if 0 <= i < self.vocab_size])
        return self._padded(banned) if any(banned) else None

    def _floats(self, values: list[float]) -> torch.Tensor:
        return self._to_device(values, torch.float32)

    def _padded(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(r) for r in rows))
        return self._to_device([r + [-1] * (width - len(r)) for r in rows], torch.int64)
