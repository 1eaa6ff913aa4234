"""The messages between an engine client (API process, LLM) and the engine core.

These are the only types that cross the process boundary, encoded with msgspec. The core turns
an EngineRequest into its own mutable `engine.request.Request`; it never hands that back.
"""

from __future__ import annotations

import enum

import msgspec

from engine.sampling_params import SamplingParams
from vision.inputs import MultiModalItem


class FinishReason(str, enum.Enum):
    STOP = "stop"      # EOS, a stop token id, or (decided by the client) a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"    # aborted by the client (disconnect, stop string) or by an error
    ERROR = "error"    # this request failed inside the engine (bad media, ...); others go on


class EngineRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    mm_items: list[MultiModalItem] = []  # sorted by placeholder.offset
    arrival_time: float = 0.0
    # Extra prefix-cache salt (e.g. a tenant id); requests with different salts share no blocks.
    cache_salt: str | None = None


class TokenLogprobs(msgspec.Struct, array_like=True, gc=False):
    """Logprobs at one position: the chosen token first, then the top-k by rank."""

    token_ids: list[int]     # [1 + k]
    logprobs: list[float]    # [1 + k]
    ranks: list[int]         # [1 + k], 1-based rank of each token in the full distribution


class EngineOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None   # one per new token when requested
    # Sent once, with the first output: one entry per prompt position (None for position 0).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None   # the stop token id that ended it
    num_cached_tokens: int = 0             # prompt tokens served from the prefix cache
    error: str | None = None               # with FinishReason.ERROR: a message for the user
    # Beam search: the hypothesis' sum of token log-probs (sent with its only output).
    cumulative_logprob: float | None = None


class SchedulerStats(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0         # fraction of blocks in use, 0..1
    num_prompt_tokens: int = 0          # prompt tokens computed this step
    num_generation_tokens: int = 0      # tokens sampled this step
    num_preemptions: int = 0            # cumulative
    prefix_cache_queries: int = 0       # cumulative prompt tokens looked up
    prefix_cache_hits: int = 0          # cumulative prompt tokens found
    num_free_blocks: int = 0
    num_total_blocks: int = 0


class EngineOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    outputs: list[EngineOutput] = []
    stats: SchedulerStats | None = None
    timestamp: float = 0.0


class AbortRequests(msgspec.Struct, array_like=True, gc=False):
    req_ids: list[str]
