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

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.layers.attention import AttentionMetadata
from engine.runner.transfer import StepUploads
from engine.runner.sampling_rows import PendingTokens, SamplingTable, build_sampling_batch
from engine.sampler import SamplingBatch
from engine.sampling_params import SamplingParams
from engine.scheduler_output import ForkedRequestData, NewRequestData, SchedulerOutput
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
    row: int = -1   # its row of InputBatch.block_table
    # Sampled by a launched step whose output has not reached the host yet (async scheduling:
    # 0 or 1). Its value is on the device: InputBatch.last_sampled.
    num_pending: int = 0
    _prompt_token_set: np.ndarray | None = field(default=None, repr=False, compare=False)
    _token_rules: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def prompt_token_set(self) -> np.ndarray:
        """The distinct prompt token ids, int64, made once: the repetition penalty asks only whether a
        token was seen, every step (an image's hundreds of placeholder tokens count once)."""
        if self._prompt_token_set is None:
            self._prompt_token_set = np.unique(np.array(self.prompt_token_ids, dtype=np.int64))
        return self._prompt_token_set

    @property
    def token_rules(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logit_bias token ids int64, their biases float32, allowed_token_ids int64), made once: the
        sampler reads them every step and they never change while the request runs."""
        if self._token_rules is None:
            params = self.sampling_params
            bias = params.logit_bias or {}
            self._token_rules = (np.array(list(bias), dtype=np.int64), np.array(list(bias.values()), dtype=np.float32),
                                 np.array(params.allowed_token_ids or (), dtype=np.int64))
        return self._token_rules

    @property
    def num_tokens(self) -> int:
        """Known on the host (prompt + appended outputs)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_positions(self) -> int:
        """Output tokens sampled so far, pending ones included: the next sample's index."""
        return len(self.output_token_ids) + self.num_pending

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
    logits_indices: torch.Tensor | None     # [S] int64, their last-token rows; None: every row (S = T)
    sampling: SamplingBatch | None
    # req_id -> (first row, prompt token ids the rows predict, emits None for position 0 first)
    prompt_logprob_rows: dict[str, tuple[int, list[int], bool]] = field(default_factory=dict)
    # every request computes output-token positions only (no prompt rows): CUDA-graph eligible
    is_past_prompts: bool = False


class BlockTable:
    """Persistent block table, one row per live request, kept current from the scheduler's diffs
    (blocks are only appended), so a step gathers its rows instead of re-padding every list.

        table  [rows, max_blocks] int32     row r: block_ids of its request, then 0s (padding)
    """

    def __init__(self) -> None:
        self.table = np.zeros((0, 0), dtype=np.int32)   # [rows, max_blocks]
        self._free_rows: list[int] = []

    def add_row(self, block_ids: list[int]) -> int:
        row = self._free_rows.pop() if self._free_rows else self._grow_rows()
        self.table[row] = 0
        self.write(row, 0, block_ids)
        return row

    def release(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, first: int, block_ids: list[int]) -> None:
        """block_ids become the row's blocks first, first + 1, ..."""
        end, width = first + len(block_ids), self.table.shape[1]
        if end > width:
            self.table = np.pad(self.table, ((0, 0), (0, max(end, 2 * width) - width)))
        self.table[row, first:end] = block_ids

    def _grow_rows(self) -> int:
        num_rows = self.table.shape[0]
        self.table = np.pad(self.table, ((0, max(num_rows, 8)), (0, 0)))
        self._free_rows.extend(range(self.table.shape[0] - 1, num_rows, -1))
        return num_rows


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
        self.block_table = BlockTable()
        self.sampling_table = SamplingTable(vocab_size, default_seed)   # rows as the block table's
        # The last launched step's sampled tokens, on the device ([S] int64), and each sampling
        # request's index in it: the next step reads pending tokens from there.
        self.last_sampled: torch.Tensor | None = None
        self.last_sampled_index: dict[str, int] = {}
        self.uploads = StepUploads(device)

    # --- state updates -----------------------------------------------------------------------

    def update(self, scheduler_output: SchedulerOutput) -> list[NewRequestData]:
        """Apply the scheduler's diff; returns the new requests (the runner may add M-RoPE
        positions or encoder state to them)."""
        for req_id in scheduler_output.finished_req_ids:
            self._remove(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            self._remove(new.req_id)
            state = self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id, prompt_token_ids=list(new.prompt_token_ids),
                output_token_ids=list(new.output_token_ids), sampling_params=new.sampling_params,
                block_ids=list(new.block_ids), num_computed_tokens=new.num_computed_tokens,
                mm_items=list(new.mm_items))
            self._take_row(state)
        self._apply_forks(scheduler_output.forked_reqs)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, new_block_ids, num_computed in zip(cached.req_ids, cached.new_block_ids,
                                                       cached.num_computed_tokens):
            state = self.requests[req_id]
            if new_block_ids:
                self.block_table.write(state.row, len(state.block_ids), new_block_ids)
                state.block_ids.extend(new_block_ids)
            state.num_computed_tokens = num_computed
        return scheduler_output.scheduled_new_reqs

    def _apply_forks(self, forked_reqs: list[ForkedRequestData]) -> None:
        """Beam search: each slot becomes a copy of its parent (as of the step's start) with the
        given tokens and blocks. Parents are read before any slot is rewritten."""
        parents = {fork.parent_req_id: self.requests[fork.parent_req_id] for fork in forked_reqs}
        for fork in forked_reqs:
            parent = parents[fork.parent_req_id]
            self._remove(fork.req_id)
            state = self.requests[fork.req_id] = dataclasses.replace(
                parent, req_id=fork.req_id, output_token_ids=list(fork.output_token_ids),
                block_ids=list(fork.block_ids), num_computed_tokens=fork.num_computed_tokens)
            self._take_row(state)

    def _remove(self, req_id: str) -> None:
        state = self.requests.pop(req_id, None)
        if state is not None:
            self.block_table.release(state.row)

    def append_sampled(self, req_ids: list[str], sampled_token_ids: list[list[int]]) -> None:
        """A step's tokens reached the host; requests removed since it launched are skipped."""
        for req_id, tokens in zip(req_ids, sampled_token_ids):
            state = self.requests.get(req_id)
            if state is not None and tokens:
                state.output_token_ids.extend(tokens)
                state.num_pending = max(0, state.num_pending - len(tokens))

    def mark_launched(self, sampling_req_ids: list[str], sampled: torch.Tensor) -> None:
        """sampled [S]: the tokens this step samples (device). Until append_sampled they are
        pending: later steps take them from this tensor."""
        for req_id in sampling_req_ids:
            self.requests[req_id].num_pending += 1
        self.last_sampled = sampled
        self.last_sampled_index = {req_id: i for i, req_id in enumerate(sampling_req_ids)}

    # --- one step's tensors ------------------------------------------------------------------

    def prepare(self, scheduler_output: SchedulerOutput) -> StepBatch:
        """Python touches each request once (_gather); positions, slots and tables are numpy."""
        req_ids = list(scheduler_output.num_scheduled_tokens)
        counts = list(scheduler_output.num_scheduled_tokens.values())
        states = [self.requests[r] for r in req_ids]
        step = _gather(states, counts, self.last_sampled_index)
        ends = np.array(step.ends, dtype=np.int64)                                # [R]
        self._check_blocks(states, ends, np.array(step.num_blocks, dtype=np.int64))
        query_start_loc = np.zeros(len(counts) + 1, dtype=np.int64)                # [R + 1]
        np.cumsum(counts, out=query_start_loc[1:])
        req_of_token = np.repeat(np.arange(len(counts)), counts)                  # [T]
        # a row's position: its request's first position + its offset within the request
        token_pos = np.arange(query_start_loc[-1]) - (query_start_loc[:-1] - ends + counts)[req_of_token]
        rows = np.array(step.rows, dtype=np.int64)                                 # [R]
        table = self.block_table.table                                             # [rows, max_blocks]
        slots = (table[rows[req_of_token], token_pos // self.block_size].astype(np.int64) * self.block_size
                 + token_pos % self.block_size)                                    # [T]
        sampling_req_ids = [r for r, samples in zip(req_ids, step.samples) if samples]
        logits_indices = query_start_loc[1:][np.array(step.samples, dtype=bool)] - 1   # [S]
        positions = self._positions(states, token_pos, req_of_token, query_start_loc, ends, counts,
                                    step.prompt_reqs)
        batch = StepBatch(
            req_ids=req_ids, num_scheduled_tokens=counts,
            input_ids=self._input_ids(step),
            positions=self._to_device(positions, torch.int64),
            attn_metadata=self._attn_metadata(counts, query_start_loc, ends, slots,
                                              table[rows, :max(step.num_blocks)]),
            sampling_req_ids=sampling_req_ids,
            # every row samples (a decode step): the hidden rows themselves, no gather
            logits_indices=(None if len(logits_indices) == len(token_pos)
                            else self._to_device(logits_indices, torch.int64)),
            sampling=self.sampling_batch(sampling_req_ids) if sampling_req_ids else None,
            prompt_logprob_rows=step.prompt_rows, is_past_prompts=step.is_past_prompts)
        self.uploads.ready()   # the forward reads them
        return batch

    def _input_ids(self, step: "_Gathered") -> torch.Tensor:
        """[T] int64 on the device; pending rows filled from the last step's sampled tensor
        (a device gather, queued after that step: no wait for it on the host). A decode step whose
        every row is pending, in the order the last step sampled them, is that tensor itself."""
        num_rows, pending = len(step.input_ids), step.pending_rows
        if (self.last_sampled is not None and len(pending) == num_rows == self.last_sampled.shape[0]
                and pending == step.pending_sources == list(range(num_rows))):
            return self.last_sampled
        # numpy first: torch.tensor(list) costs ~20 us a call, np.array + from_numpy a few
        input_ids = self._to_device(np.array(step.input_ids, dtype=np.int64), torch.int64)
        if pending:
            where = self._to_device(np.array([pending, step.pending_sources], dtype=np.int64), torch.int64)  # [2, n]
            self.uploads.ready()
            input_ids[where[0]] = self.last_sampled[where[1]]
        return input_ids

    def _check_blocks(self, states: list[CachedRequestState], ends: np.ndarray, num_blocks: np.ndarray) -> None:
        short = np.flatnonzero((ends + self.block_size - 1) // self.block_size > num_blocks)
        if short.size:
            state = states[short[0]]
            raise ValueError(f"request {state.req_id}: {len(state.block_ids)} blocks cannot hold "
                             f"{ends[short[0]]} tokens")

    def _positions(self, states, token_pos, req_of_token, query_start_loc, ends, counts,
                   prompt_reqs: list[int]) -> np.ndarray:
        """-> [T] positions, or [3, T] for M-RoPE: prompt rows (of the requests prompt_reqs
        indexes) from the request's table (mrope_positions), later positions p + mrope_delta on
        all three axes."""
        if not self.uses_mrope:
            return token_pos
        deltas = np.array([s.mrope_delta for s in states], dtype=np.int64)          # [R]
        positions = np.repeat((token_pos + deltas[req_of_token])[None], 3, axis=0)  # [3, T]
        for i in prompt_reqs:   # the others compute output positions only
            state = states[i]
            start, table = int(ends[i]) - counts[i], state.mrope_positions
            if table is None:
                continue
            stop, first = min(int(ends[i]), table.shape[1]), query_start_loc[i]
            positions[:, first:first + stop - start] = table[:, start:stop].numpy()
        return positions

    @staticmethod
    def _prompt_logprob_targets(state: CachedRequestState, start: int, end: int, first_row: int):
        """Row p (position p) predicts prompt token p + 1: rows [start, min(end, P - 1))."""
        targets = state.prompt_token_ids[start + 1:min(end, len(state.prompt_token_ids) - 1) + 1]
        return first_row, targets, start == 0

    def _attn_metadata(self, counts: list[int], query_start_loc: np.ndarray, seq_lens: np.ndarray,
                       slots: np.ndarray, block_tables: np.ndarray) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self._to_device(query_start_loc, torch.int32),
            seq_lens=self._to_device(seq_lens, torch.int32),
            slot_mapping=self._to_device(slots, torch.int64),
            block_tables=self._to_device(block_tables, torch.int32),
            max_query_len=max(counts), max_seq_len=int(seq_lens.max()), num_reqs=len(counts),
            num_actual_tokens=int(query_start_loc[-1]), query_lens_cpu=list(counts),
            seq_lens_cpu=seq_lens.tolist())

    def _to_device(self, values: list | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(values, np.ndarray):   # a fresh array of this step: no copy on the CPU
            tensor = torch.from_numpy(np.ascontiguousarray(values))
            return self.uploads.to_device(tensor if tensor.dtype == dtype else tensor.to(dtype))
        return self.uploads.to_device(torch.tensor(values, dtype=dtype))

    # --- sampling settings -------------------------------------------------------------------

    def sampling_batch(self, req_ids: list[str]) -> SamplingBatch:
        states = [self.requests[r] for r in req_ids]
        pending = (PendingTokens(self.last_sampled, self.last_sampled_index)
                   if self.last_sampled is not None else None)
        return build_sampling_batch(states, self.sampling_table, self.eos_token_ids, self._to_device, pending,
                                    self.uploads.ready)

    def _take_row(self, state: CachedRequestState) -> None:
        """A block-table row (and its sampling-table row) for a request entering the batch."""
        state.row = self.block_table.add_row(state.block_ids)
        self.sampling_table.write(state.row, state.req_id, state.sampling_params)


@dataclass
class _Gathered:
    """What prepare needs from each request's Python state, in batch order."""
    input_ids: list[int] = field(default_factory=list)     # [T]
    ends: list[int] = field(default_factory=list)          # [R] num_computed_tokens + scheduled
    num_blocks: list[int] = field(default_factory=list)    # [R]
    rows: list[int] = field(default_factory=list)          # [R] block-table rows
    samples: list[bool] = field(default_factory=list)      # [R] all its tokens known after the step
    prompt_rows: dict[str, tuple[int, list[int], bool]] = field(default_factory=dict)
    prompt_reqs: list[int] = field(default_factory=list)   # indices of requests computing prompt rows
    is_past_prompts: bool = True
    # tokens still on the device: their rows of input_ids and indices in InputBatch.last_sampled
    pending_rows: list[int] = field(default_factory=list)
    pending_sources: list[int] = field(default_factory=list)


def _gather(states: list[CachedRequestState], counts: list[int], pending_index: dict[str, int]) -> _Gathered:
    # Once per request per step: locals and plain lengths, no properties; a decode's one row is
    # either its last known token or the pending one.
    step = _Gathered()
    input_ids, ends, num_blocks, rows, samples = step.input_ids, step.ends, step.num_blocks, step.rows, step.samples
    for index, (state, num_new) in enumerate(zip(states, counts)):
        start, num_prompt = state.num_computed_tokens, len(state.prompt_token_ids)
        num_known = num_prompt + len(state.output_token_ids)
        end, num_tokens = start + num_new, num_known + state.num_pending
        if end > num_tokens:
            raise ValueError(f"request {state.req_id}: scheduled up to token {end} but only "
                             f"{num_tokens} are sampled")
        if start < num_prompt:
            step.is_past_prompts = False
            step.prompt_reqs.append(index)
            if state.sampling_params.prompt_logprobs is not None:
                step.prompt_rows[state.req_id] = InputBatch._prompt_logprob_targets(
                    state, start, end, len(input_ids))
        if start < num_known:
            input_ids += state.token_ids(start, min(end, num_known))
        if end > num_known:   # the pending token (async scheduling): filled on the device
            step.pending_rows.append(len(input_ids))
            step.pending_sources.append(pending_index[state.req_id])
            input_ids.append(0)
        ends.append(end)
        num_blocks.append(len(state.block_ids))
        rows.append(state.row)
        samples.append(end == num_tokens)
    return step
