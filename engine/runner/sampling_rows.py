"""The sampler's per-row settings of one step (a SamplingBatch), from the runner's request states.
Caller: engine.runner.input_batch.InputBatch.sampling_batch.

A request's settings never change while it runs, so each state keeps them as one tuple of
numbers (SamplingRow, made on its first sampling step); a step stacks the rows of its sampling
requests into a [R, 8] table and reads every flag as a column test instead of a pass over
SamplingParams objects. Only the output position (seed keys, min_tokens) is read per step.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from engine.sampler import SamplingBatch, mix_seed, seed_keys_of_mixed

# Columns of the [R, 8] float64 table (token counts and top-k are exact in float64).
_TEMPERATURE, _TOP_K, _TOP_P, _MIN_P, _HAS_TOP_K, _HAS_PENALTY, _MIN_TOKENS, _LOGPROBS = range(8)


class SamplingRow(NamedTuple):
    numbers: tuple[float, ...]   # the 8 columns above; logprobs -1 = not asked
    mixed_seed: int              # sampler.mix_seed of the request's seed


def make_sampling_row(state, vocab_size: int, default_seed: int) -> SamplingRow:
    params = state.sampling_params
    seed = params.seed
    if seed is None:   # unseeded (the frontend normally assigns one): derived from the request id
        seed = zlib.crc32(state.req_id.encode()) ^ default_seed
    has_penalty = (params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0
                   or params.presence_penalty != 0.0)
    numbers = (params.temperature, params.effective_top_k or vocab_size, params.top_p, params.min_p,
               float(bool(params.effective_top_k)), float(has_penalty), params.min_tokens,
               -1 if params.logprobs is None else params.logprobs)
    return SamplingRow(numbers, mix_seed(seed))


def build_sampling_batch(states: list, rows: list[SamplingRow], eos_token_ids: tuple[int, ...], vocab_size: int,
                         to_device: Callable[[np.ndarray | list, torch.dtype], torch.Tensor]) -> SamplingBatch:
    """states: the sampling requests' CachedRequestStates in batch order; rows: their SamplingRows."""
    table = np.array([row.numbers for row in rows], dtype=np.float64)                  # [R, 8]
    positions = np.array([len(s.output_token_ids) + s.num_pending for s in states], dtype=np.int64)  # [R]
    mixed_seeds = np.array([row.mixed_seed for row in rows], dtype=np.uint64)          # [R]
    batch = SamplingBatch(
        temperature=to_device(table[:, _TEMPERATURE], torch.float32),
        seed_keys=to_device(seed_keys_of_mixed(mixed_seeds, positions), torch.int64),
        all_greedy=bool((table[:, _TEMPERATURE] < 1e-5).all()))
    if table[:, _HAS_TOP_K].any():
        batch.top_k = to_device(table[:, _TOP_K], torch.int64)
    if (table[:, _TOP_P] < 1.0).any():
        batch.top_p = to_device(table[:, _TOP_P], torch.float32)
    if (table[:, _MIN_P] > 0.0).any():
        batch.min_p = to_device(table[:, _MIN_P], torch.float32)
    if table[:, _HAS_PENALTY].any():
        _add_penalties(batch, states, to_device)
    if (positions < table[:, _MIN_TOKENS]).any():
        batch.banned_token_ids = _banned_tokens(states, positions, eos_token_ids, vocab_size, to_device)
    max_logprobs = table[:, _LOGPROBS].max()
    batch.max_num_logprobs = int(max_logprobs) if max_logprobs >= 0 else None
    return batch


def _add_penalties(batch: SamplingBatch, states: list, to_device) -> None:
    params = [s.sampling_params for s in states]
    if any(p.repetition_penalty != 1.0 for p in params):
        batch.repetition_penalty = to_device([p.repetition_penalty for p in params], torch.float32)
        batch.prompt_token_ids = _padded([s.prompt_token_ids for s in states], to_device)
    if any(p.frequency_penalty != 0.0 for p in params):
        batch.frequency_penalty = to_device([p.frequency_penalty for p in params], torch.float32)
    if any(p.presence_penalty != 0.0 for p in params):
        batch.presence_penalty = to_device([p.presence_penalty for p in params], torch.float32)
    if any(s.num_pending for s in states):   # engine.core waits for them (needs_host_tokens)
        raise RuntimeError("penalties need every output token on the host")
    batch.output_token_ids = _padded([s.output_token_ids for s in states], to_device)


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
    return _padded(banned, to_device) if any(banned) else None


def _padded(rows: list[list[int]], to_device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return to_device([r + [-1] * (width - len(r)) for r in rows], torch.int64)
