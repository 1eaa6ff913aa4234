"""Sampler: logits of one step's sampling rows -> next tokens (and logprobs when asked).

Caller: engine.runner.model_runner, with a SamplingBatch built by engine.runner.input_batch.
Order (vLLM's): penalties -> min_tokens ban -> [greedy rows: argmax] -> temperature -> min-p ->
top-k -> top-p -> seeded sampling. Logprobs are of the RAW logits (before any of this).

Seeded sampling is stateless: a row samples argmax(log p + Gumbel noise) where the noise of
token v is a hash of (the request's seed, its output position, v). The same request thus draws
the same token whatever the batch, after a preemption, and on CPU and GPU alike; no generator
state is carried between steps and the batch needs one vectorised pass, not one RNG per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import vlserve_kernels as kernels

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seed_key(seed: int, output_position: int) -> tuple[int, int]:
    """Two 32-bit keys of the noise for one request's output position (a Python-side mix)."""
    key = _splitmix64(_splitmix64(seed & _MASK64) ^ output_position)
    return key & 0xFFFFFFFF, key >> 32


def mix_seed(seed: int) -> int:
    """The first half of seed_key, fixed per request (the runner keeps it between steps)."""
    return _splitmix64(seed & _MASK64)


def seed_keys(seeds: list[int], output_positions: list[int]) -> np.ndarray:
    """seed_key of many rows at once -> [R, 2] int64."""
    return seed_keys_of_mixed(np.array([mix_seed(seed) for seed in seeds], dtype=np.uint64), output_positions)


def seed_keys_of_mixed(mixed_seeds: np.ndarray, output_positions) -> np.ndarray:
    """mixed_seeds [R] uint64 (mix_seed of each row's seed) -> [R, 2] int64 keys, as seed_key
    (uint64 arrays wrap like the masks above)."""
    x: np.ndarray = mixed_seeds ^ np.asarray(output_positions, dtype=np.uint64)       # [R] uint64
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    key = x ^ (x >> np.uint64(31))
    return np.stack([key & np.uint64(0xFFFFFFFF), key >> np.uint64(32)], axis=1).astype(np.int64)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # x * c mod 2^32 for 0 <= x < 2^32, in int64 without overflow: split c into 16-bit halves.
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    # "lowbias32" integer finaliser (C. Wellons): full avalanche on 32-bit inputs.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed_keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """seed_keys [R, 2] int64 -> Gumbel(0, 1) noise [R, vocab] float32, a pure function."""
    token = torch.arange(vocab_size, device=seed_keys.device, dtype=torch.int64)
    x = _mul32(token, 0x9E3779B9)[None, :] ^ seed_keys[:, :1]     # [R, V]
    x = _hash32(x) ^ seed_keys[:, 1:]
    x = _hash32(x)
    uniform = ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # (0, 1)
    return -torch.log(-torch.log(uniform))


@dataclass
class SamplingBatch:
    """Per-row sampling settings, one row per request that samples this step. Optional tensors
    are None when no row of the batch uses that feature (its op is skipped)."""

    temperature: torch.Tensor                    # [R] float32; 0 = greedy
    seed_keys: torch.Tensor                      # [R, 2] int64, from seed_key(seed, output position)
    all_greedy: bool
    top_k: torch.Tensor | None = None            # [R] int64; vocab_size = off
    top_p: torch.Tensor | None = None            # [R] float32; 1 = off
    min_p: torch.Tensor | None = None            # [R] float32; 0 = off
    repetition_penalty: torch.Tensor | None = None  # [R] float32; 1 = off
    presence_penalty: torch.Tensor | None = None    # [R] float32
    frequency_penalty: torch.Tensor | None = None   # [R] float32
    prompt_token_ids: torch.Tensor | None = None    # [R, P] int64, -1 padded: prompt tokens (repeats allowed)
    output_token_ids: torch.Tensor | None = None    # [R, max_output_len] int64, padded with -1
    banned_token_ids: torch.Tensor | None = None    # [R, max_banned] int64, -1 padded (min_tokens)
    logit_bias_ids: torch.Tensor | None = None      # [R, W] int64, -1 padded: logit_bias tokens
    logit_bias_values: torch.Tensor | None = None   # [R, W] float32: their biases (0 at padding)
    allowed_token_ids: torch.Tensor | None = None   # [R, W] int64, -1 padded; an all -1 row: unrestricted
    max_num_logprobs: int | None = None             # largest top-k asked for; None: no logprobs
    # [structured outputs] rows under a grammar and their allowed tokens (bit set = allowed).
    grammar_rows: torch.Tensor | None = None        # [C] int64, indices into the R rows
    grammar_bitmask: torch.Tensor | None = None     # [C, ceil(vocab / 32)] int32


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor               # [R] int64
    # With max_num_logprobs = k: sampled token first, then the top-k of log_softmax(raw logits).
    logprob_token_ids: torch.Tensor | None = None  # [R, 1 + k] int64
    logprobs: torch.Tensor | None = None           # [R, 1 + k] float32
    logprob_ranks: torch.Tensor | None = None      # [R, 1 + k] int64, 1-based


class Sampler(torch.nn.Module):
    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits [R, vocab] (any float dtype) -> SamplerOutput."""
        if (batch.all_greedy and batch.max_num_logprobs is None and batch.banned_token_ids is None
                and batch.repetition_penalty is None and batch.frequency_penalty is None
                and batch.presence_penalty is None and batch.grammar_rows is None
                and batch.logit_bias_ids is None and batch.allowed_token_ids is None):
            # Greedy fast path: argmax of the raw logits (float32 widening is exact, same index).
            return SamplerOutput(sampled_token_ids=logits.argmax(dim=-1))
        logits = logits.float()
        raw_logits = logits
        # vLLM's order: allowed tokens, then the logit bias, then the penalties
        logits = restrict_tokens(logits, batch.allowed_token_ids)
        logits = apply_logit_bias(logits, batch.logit_bias_ids, batch.logit_bias_values)
        logits = apply_penalties(logits, batch)
        logits = ban_tokens(logits, batch.banned_token_ids)
        if batch.grammar_rows is not None:
            if logits is raw_logits and batch.max_num_logprobs is not None:
                logits = logits.clone()   # masked in place below; logprobs read the unmasked logits
            apply_grammar_bitmask(logits, batch.grammar_rows, batch.grammar_bitmask)
        sampled = logits.argmax(dim=-1)
        if not batch.all_greedy:
            sampled = torch.where(batch.temperature < 1e-5, sampled, self._sample(logits, batch))
        out = SamplerOutput(sampled_token_ids=sampled)
        if batch.max_num_logprobs is not None:
            out.logprob_token_ids, out.logprobs, out.logprob_ranks = compute_logprobs(
                raw_logits, sampled, batch.max_num_logprobs)
        return out

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        temperature = torch.where(batch.temperature < 1e-5, 1.0, batch.temperature)
        logits = logits / temperature[:, None]
        logits = apply_min_p(logits, batch.min_p)
        logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        log_probs = torch.log_softmax(logits, dim=-1)
        return (log_probs + gumbel_noise(batch.seed_keys, logits.shape[-1])).argmax(dim=-1)


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """token_ids [R, L] padded with -1 -> counts [R, vocab] int32."""
    index = torch.where(token_ids < 0, vocab_size, token_ids)
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.int32, device=token_ids.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (HF/vLLM: positive logits / p, negative * p, over prompt + output tokens), then
    frequency and presence (OpenAI: over output tokens only)."""
    if batch.repetition_penalty is None and batch.frequency_penalty is None and batch.presence_penalty is None:
        return logits
    empty = torch.empty(logits.shape[0], 0, dtype=torch.int64, device=logits.device)
    output_ids = batch.output_token_ids if batch.output_token_ids is not None else empty
    if batch.repetition_penalty is not None:
        prompt_ids = batch.prompt_token_ids if batch.prompt_token_ids is not None else empty
        logits = _apply_repetition_penalty(logits, batch.repetition_penalty, torch.cat([prompt_ids, output_ids], 1))
    if batch.frequency_penalty is not None or batch.presence_penalty is not None:
        output_counts = _token_counts(output_ids, logits.shape[-1])          # [R, V]
        if batch.frequency_penalty is not None:
            logits = logits - batch.frequency_penalty[:, None] * output_counts
        if batch.presence_penalty is not None:
            logits = logits - batch.presence_penalty[:, None] * (output_counts > 0)
    return logits


def _apply_repetition_penalty(logits: torch.Tensor, penalty: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """logits [R, V] float32, penalty [R], token_ids [R, L] (the row's prompt and output tokens,
    repeats allowed, -1 = padding) -> new logits. Only the seen columns change: a gather and a
    scatter of [R, L] instead of passes over [R, V] (the repetition penalty is in Qwen's generation
    configs, so in nearly every step). Padding repeats the row's first seen id: a repeated id
    scatters the same value each time, so the result does not depend on the order of the writes."""
    if token_ids.shape[1] == 0:
        return logits
    valid = token_ids >= 0
    first = token_ids.gather(1, valid.to(torch.int32).argmax(dim=1, keepdim=True)).clamp_min(0)   # [R, 1]
    index = torch.where(valid, token_ids, first)
    seen = logits.gather(1, index)                                                              # [R, L]
    penalised = torch.where(seen > 0, seen / penalty[:, None], seen * penalty[:, None])
    # A row without any token (never from the engine: prompts are not empty) keeps column 0 as it is.
    return logits.scatter(1, index, torch.where(valid.any(dim=1, keepdim=True), penalised, seen))


def restrict_tokens(logits: torch.Tensor, allowed_token_ids: torch.Tensor | None) -> torch.Tensor:
    """allowed_token_ids [R, W] (-1 padded): a row with tokens keeps only their logits, every other one
    becomes -inf; a row of padding alone (no allowed_token_ids: they are never empty) is unchanged."""
    if allowed_token_ids is None:
        return logits
    unrestricted = (allowed_token_ids < 0).all(dim=1, keepdim=True)                                # [R, 1]
    allowed = (_token_counts(allowed_token_ids, logits.shape[-1]) > 0) | unrestricted              # [R, V]
    return logits.masked_fill(~allowed, float("-inf"))


def apply_logit_bias(logits: torch.Tensor, token_ids: torch.Tensor | None, biases: torch.Tensor | None) -> torch.Tensor:
    """logits [R, V] float32 + each row's bias at its tokens (token_ids [R, W] -1 padded, biases [R, W];
    a row's tokens are distinct, so every column gets at most one addition). -> new logits."""
    if token_ids is None:
        return logits
    assert biases is not None
    valid = token_ids >= 0
    return logits.scatter_add(1, token_ids.clamp_min(0), torch.where(valid, biases, 0.0))


def ban_tokens(logits: torch.Tensor, banned_token_ids: torch.Tensor | None) -> torch.Tensor:
    if banned_token_ids is None:
        return logits
    banned = _token_counts(banned_token_ids, logits.shape[-1]) > 0
    return logits.masked_fill(banned, float("-inf"))


def apply_grammar_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """In place: tokens a row's grammar forbids get -inf (EOS too, until the grammar may end); one
    pass of a Triton kernel on the GPU (kernels/grammar_mask.py). Logprobs are taken before this:
    they describe the model's unmasked distribution (vLLM's convention)."""
    kernels.apply_token_bitmask_inplace(logits, rows, bitmask)   # rows [C], bitmask [C, ceil(V / 32)]
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if min_p is None:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """top-k keeps tokens at least as likely as the k-th (ties kept); top-p then keeps the most
    likely tokens whose mass reaches p (the most likely one always stays). vLLM semantics."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)            # ascending
    if top_k is not None:
        vocab_size = logits.shape[-1]
        kth_index = (vocab_size - top_k.clamp(1, vocab_size))[:, None]   # [R, 1]
        kth_value = sorted_logits.gather(1, kth_index)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_value, float("-inf"))
    if top_p is not None:
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p[:, None])
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def compute_logprobs(raw_logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int):
    """raw_logits [R, V], token_ids [R] -> (ids, logprobs, ranks), each [R, 1 + num_logprobs]:
    the given token first, then the top-num_logprobs tokens of log_softmax(raw_logits)."""
    log_probs = torch.log_softmax(raw_logits.float(), dim=-1)              # [R, V]
    num_logprobs = min(num_logprobs, log_probs.shape[-1])   # beam search may ask for many
    chosen = log_probs.gather(1, token_ids[:, None])                       # [R, 1]
    chosen_rank = (log_probs > chosen).sum(dim=-1, keepdim=True) + 1
    top_values, top_ids = log_probs.topk(num_logprobs, dim=-1)              # [R, k]
    top_ranks = torch.arange(1, num_logprobs + 1, device=raw_logits.device).expand_as(top_ids)
    return (torch.cat([token_ids[:, None], top_ids], dim=1), torch.cat([chosen, top_values], dim=1),
            torch.cat([chosen_rank, top_ranks], dim=1))
