"""SchedulerOutput: what the scheduler decided for one step, handed to the model runner.

It is a diff: full data for requests the runner has not seen (or must rebuild after preemption),
only what changed for the others. The runner keeps its own per-request state between steps and
never decides who runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.sampling_params import SamplingParams
from vision.inputs import MultiModalItem


@dataclass
class NewRequestData:
    req_id: str
    # Prompt ids with placeholders already expanded (one token per embedding row).
    prompt_token_ids: list[int]
    # Tokens generated before a preemption; empty for a brand-new request. The runner needs them
    # for penalties and for the positions of the tokens it will recompute.
    output_token_ids: list[int]
    mm_items: list[MultiModalItem]
    sampling_params: SamplingParams
    # KV blocks of this request, in order; block i holds token positions [i*B, (i+1)*B).
    block_ids: list[int]
    # Tokens whose KV is already in block_ids (prefix-cache hit); the step computes from here.
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """Requests the runner already holds. Parallel lists, one entry per request."""

    req_ids: list[str] = field(default_factory=list)
    # Blocks appended since the last step (the runner extends its block table with them).
    new_block_ids: list[list[int]] = field(default_factory=list)
    # Tokens with KV computed before this step.
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class GrammarBitmask:
    """[structured outputs] The allowed next tokens of the constrained requests that sample this
    step (engine.structured_output.manager builds it; the sampler masks their logits with it)."""

    req_ids: list[str]
    bitmask: torch.Tensor = field(repr=False)   # [len(req_ids), ceil(vocab / 32)] int32, CPU; bit set = allowed

    def compact(self) -> "GrammarBitmask":
        """A copy owning its rows: the manager's tensor is a view of a reused buffer (pickling a view
        sends the whole buffer to a worker process, and the buffer is overwritten two steps later)."""
        return GrammarBitmask(req_ids=self.req_ids, bitmask=self.bitmask.clone())


@dataclass
class ForkedRequestData:
    """Beam search: the runner rebuilds `req_id` from `parent_req_id`'s state as it was at the
    start of this step (same prompt, media and M-RoPE positions) with these tokens and blocks."""

    req_id: str
    parent_req_id: str
    output_token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    # req_id -> tokens to compute this step (a prefill chunk, or 1 for a decode).
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # req_id -> indices into that request's mm_items whose encoder output must be computed this
    # step (they overlap this step's token range and are not in the encoder cache yet).
    scheduled_encoder_inputs: dict[str, list[int]]
    # Requests that finished, were aborted or were preempted since the last step: the runner
    # drops their state. A preempted request comes back later as a NewRequestData.
    finished_req_ids: set[str]
    # Encoder-cache entries the runner may drop (no scheduled request needs them any more).
    free_encoder_mm_hashes: list[str]
    # [structured outputs] Token bitmask rows of the constrained requests that sample this step;
    # None when none does. Set by engine.core only for executors that take the whole step (TP/PP
    # workers): in process the core hands it to the runner's sample_tokens instead.
    grammar_bitmask: GrammarBitmask | None = None
    # Beam search (engine.beam_search): slots re-pointed at new beams, applied after the new
    # requests and before the cached ones; then KV block copies (src, dst), made before the forward.
    forked_reqs: list[ForkedRequestData] = field(default_factory=list)
    kv_block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0
