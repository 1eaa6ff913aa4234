"""The sampler's per-row settings of one step (a SamplingBatch), from the runner's request states.
Caller: engine.runner.input_batch.InputBatch (write when a request enters, build each step).

A request's settings never change while it runs, so they are written once, as numbers, into a
persistent table with one row per block-table row (SamplingTable); a step gathers the rows of
its sampling requests into a [R, columns] array and reads every flag as a column test instead of a
pass over SamplingParams objects. Only the output position (seed keys, min_tokens) is per step.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.sampler import SamplingBatch, mix_seed, seed_keys_of_mixed

# Columns of SamplingTable.numbers (float64: token counts and top-k are exact).
(_TEMPERATURE, _TOP_K, _TOP_P, _MIN_P, _HAS_TOP_K, _HAS_PENALTY, _MIN_TOKENS, _LOGPROBS, _HAS_LOGIT_BIAS,
 _HAS_ALLOWED) = range(10)
_NUM_COLUMNS = 10


class SamplingTable:
    """numbers [rows, 10] float64 (the columns above; logprobs -1 = not asked) and mixed_seeds
    [rows] uint64 (sampler.mix_seed of the request's seed); row r belongs to the request that
    holds block-table row r (InputBatch writes it whenever a request takes a row)."""

    def __init__(self, vocab_size: int, default_seed: int) -> None:
        self.vocab_size = vocab_size
        self.default_seed = default_seed
        self.numbers = np.zeros((0, _NUM_COLUMNS), dtype=np.float64)
        self.mixed_seeds = np.zeros(0, dtype=np.uint64)

    def write(self, row: int, req_id: str, params) -> None:
        if row >= len(self.mixed_seeds):
            num_rows = max(2 * len(self.mixed_seeds), row + 1, 8)
            self.numbers = np.resize(self.numbers, (num_rows, _NUM_COLUMNS))
            self.mixed_seeds = np.resize(self.mixed_seeds, num_rows)
        seed = params.seed
        if seed is None:   # unseeded (the frontend normally assigns one): derived from the request id
            seed = zlib.crc32(req_id.encode()) ^ self.default_seed
        has_penalty = (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                       or params.presence_penalty != 0.0)
        # top-k 1 keeps only the most likely token whatever the temperature, top-p and min-p (HF and
        # vLLM): the row is greedy (Qwen2.5-VL's generation config sets it), and a batch of such rows
        # takes the sampler's argmax instead of a sort and a softmax over the vocabulary per step.
        temperature = 0.0 if params.effective_top_k == 1 else params.temperature
        self.numbers[row] = (temperature, params.effective_top_k or self.vocab_size, params.top_p,
                             params.min_p, bool(params.effective_top_k), has_penalty, params.min_tokens,
                             -1 if params.logprobs is None else params.logprobs, bool(params.logit_bias),
                             params.allowed_token_ids is not None)
        self.mixed_seeds[row] = mix_seed(seed)


@dataclass(frozen=True)
class PendingTokens:
    """Async scheduling: the tokens the step on the device samples (InputBatch.last_sampled, [S]
    int64 on the device) and each of its requests' index into them. A request has at most one
    such token (CachedRequestState.num_pending)."""

    sampled: torch.Tensor
    index: dict[str, int]


def build_sampling_batch(states: list, table: SamplingTable, eos_token_ids: tuple[int, ...],
                         to_device: Callable[[np.ndarray | list, torch.dtype], torch.Tensor],
                         pending: PendingTokens | None = None,
                         uploads_ready: Callable[[], None] = lambda: None) -> SamplingBatch:
    """states: the sampling requests' CachedRequestStates, in batch order; pending: where their
    tokens still on the device are (the penalties count them without waiting for them);
    uploads_ready: makes device work queued next see what to_device uploaded (engine.runner.transfer
    StepUploads: the copies run on a stream of their own)."""
    rows = np.array([s.row for s in states], dtype=np.int64)                            # [R]
    numbers = table.numbers[rows]                                                        # [R, 10]
    positions = np.array([len(s.output_token_ids) + s.num_pending for s in states], dtype=np.int64)  # [R]
    batch = SamplingBatch(
        temperature=to_device(numbers[:, _TEMPERATURE], torch.float32),
        seed_keys=to_device(seed_keys_of_mixed(table.mixed_seeds[rows], positions), torch.int64),
        all_greedy=bool((numbers[:, _TEMPERATURE] < 1e-5).all()))
    if numbers[:, _HAS_TOP_K].any():
        batch.top_k = to_device(numbers[:, _TOP_K], torch.int64)
    if (numbers[:, _TOP_P] < 1.0).any():
        batch.top_p = to_device(numbers[:, _TOP_P], torch.float32)
    if (numbers[:, _MIN_P] > 0.0).any():
        batch.min_p = to_device(numbers[:, _MIN_P], torch.float32)
    if numbers[:, _HAS_PENALTY].any():
        _add_penalties(batch, states, to_device, pending, uploads_ready)
    if numbers[:, _HAS_LOGIT_BIAS].any():
        batch.logit_bias_ids = to_device(_stacked([s.token_rules[0] for s in states], -1, np.int64), torch.int64)
        batch.logit_bias_values = to_device(_stacked([s.token_rules[1] for s in states], 0.0, np.float32),
                                            torch.float32)
    if numbers[:, _HAS_ALLOWED].any():
        batch.allowed_token_ids = to_device(_stacked([s.token_rules[2] for s in states], -1, np.int64), torch.int64)
    if (positions < numbers[:, _MIN_TOKENS]).any():
        batch.banned_token_ids = _banned_tokens(states, positions, eos_token_ids, table.vocab_size, to_device)
    max_logprobs = numbers[:, _LOGPROBS].max()
    batch.max_num_logprobs = int(max_logprobs) if max_logprobs >= 0 else None
    return batch


def _add_penalties(batch: SamplingBatch, states: list, to_device, pending: PendingTokens | None,
                   uploads_ready: Callable[[], None]) -> None:
    params = [s.sampling_params for s in states]
    if any(p.repetition_penalty != 1.0 for p in params):
        batch.repetition_penalty = to_device([p.repetition_penalty for p in params], torch.float32)
        prompts = [s.prompt_token_set for s in states]
        ids = np.full((len(states), max(1, max(len(p) for p in prompts))), -1, dtype=np.int64)
        for i, prompt in enumerate(prompts):
            ids[i, :len(prompt)] = prompt
        batch.prompt_token_ids = to_device(ids, torch.int64)
    if any(p.frequency_penalty != 0.0 for p in params):
        batch.frequency_penalty = to_device([p.frequency_penalty for p in params], torch.float32)
    if any(p.presence_penalty != 0.0 for p in params):
        batch.presence_penalty = to_device([p.presence_penalty for p in params], torch.float32)
    batch.output_token_ids = _output_token_ids(states, to_device, pending, uploads_ready)


def _output_token_ids(states: list, to_device, pending: PendingTokens | None,
                      uploads_ready: Callable[[], None]) -> torch.Tensor:
    """[R, W] int64 on the device, -1 padded: each row's output tokens, the one still on the device
    last (async scheduling), copied there from the step that samples it: no wait for that step."""
    ids = np.full((len(states), max(1, max(s.num_output_positions for s in states))), -1, dtype=np.int64)
    rows, sources = [], []
    for i, state in enumerate(states):
        ids[i, :len(state.output_token_ids)] = state.output_token_ids
        if state.num_pending:
            if state.num_pending > 1 or pending is None or state.req_id not in pending.index:
                raise RuntimeError(f"request {state.req_id}: {state.num_pending} pending tokens, not on the device")
            rows.append(i)
            sources.append(pending.index[state.req_id])
    output_ids = to_device(ids, torch.int64)
    if rows:   # one upload: [3, n] rows, columns, indices into pending.sampled
        where = to_device(np.array([rows, [len(states[i].output_token_ids) for i in rows], sources],
                                   dtype=np.int64), torch.int64)
        uploads_ready()
        output_ids[where[0], where[1]] = pending.sampled[where[2]]
    return output_ids


def _banned_tokens(states: list, positions: np.ndarray, eos_token_ids: tuple[int, ...], vocab_size: int,
                   to_device) -> torch.Tensor | None:
    """min_tokens: EOS (unless ignore_eos) and stop_token_ids cannot be sampled before it."""
    banned = []
    for state, position in zip(states, positions.tolist()):
        params = state.sampling_params
        ids = []
        if position < params.min_tokens:
            ids = list(params.stop_token_ids or []) + ([] if params.ignore_eos else list(eos_token_ids))
        banned.append([i for i in ids if 0 <= i < vocab_size])
    return to_device(_stacked(banned, -1, np.int64), torch.int64) if any(banned) else None


def _stacked(rows: Sequence[np.ndarray | list[int]], fill, dtype) -> np.ndarray:
    """Rows of different lengths -> [R, longest (at least 1)], padded with fill."""
    out = np.full((len(rows), max(1, max(len(row) for row in rows))), fill, dtype=dtype)
    for index, row in enumerate(rows):
        out[index, :len(row)] = row
    return out

