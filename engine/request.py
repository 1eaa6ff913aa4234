"""Request: the engine core's mutable state for one request, and its RequestStatus.

Built from the wire record `engine.protocol.EngineRequest` by `Request.from_engine_request`
(called by `engine.core.EngineCore.add_request`); owned and mutated by `engine.scheduler` only.
It never leaves the core process: outputs go back as `EngineOutput` records.

Progress is one number: `num_computed_tokens` (tokens whose KV is in the cache) catches up to
`num_tokens` (prompt + sampled). A prefill chunk, a decode, a prefix-cache hit and a recompute
after preemption all move that one counter (DESIGN rule 4).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from engine.protocol import EngineRequest, FinishReason, TokenLogprobs
from engine.sampling_params import SamplingParams
from vision.inputs import MultiModalItem

if TYPE_CHECKING:
    from engine.beam_search import BeamGroup
    from engine.structured_output.manager import StructuredOutputRequest


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2   # back in the waiting queue; its KV blocks were freed, it recomputes
    # Everything from here on is finished.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH_CAPPED: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


class Request:
    def __init__(self, req_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 mm_items: list[MultiModalItem] | None = None, arrival_time: float = 0.0,
                 cache_salt: str | None = None) -> None:
        self.req_id = req_id
        self.sampling_params = sampling_params
        self.mm_items = list(mm_items or [])  # sorted by placeholder.offset
        # The position after the last placeholder (0 without media): once num_computed_tokens
        # passes it, the scheduler skips encoder planning and freeing for this request.
        last = self.mm_items[-1].placeholder if self.mm_items else None
        self.media_end = last.offset + last.length if last is not None else 0
        self.arrival_time = arrival_time
        self.cache_salt = cache_salt
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)  # prompt + output, kept in step
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        # Scheduled in steps whose outputs are not processed yet (async scheduling: at most the
        # step on the device): their KV is being computed, and each such step that completes the
        # known tokens will sample one more, a placeholder until its output arrives.
        self.num_inflight_tokens = 0
        self.num_output_placeholders = 0
        self.num_cached_tokens = -1  # prefix-cache hit at first admission; -1 until admitted
        self.num_preemptions = 0
        # Chained hashes of this request's full blocks (engine.kv_cache.block_hash), grown lazily.
        self.block_hashes: list[bytes] = []
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        # Prompt logprobs arrive chunk by chunk and are sent once the prompt is fully computed.
        self.prompt_logprobs: list[TokenLogprobs | None] = []
        self.has_sent_prompt_logprobs = False
        # Its grammar and matcher (engine.structured_output.manager), set when the scheduler admits it.
        self.structured_output: StructuredOutputRequest | None = None
        # Beam search: the group this request is a slot of (engine.beam_groups), else None.
        self.beam_group: BeamGroup | None = None

    @classmethod
    def from_engine_request(cls, engine_request: EngineRequest) -> "Request":
        return cls(
            req_id=engine_request.req_id,
            prompt_token_ids=engine_request.prompt_token_ids,
            sampling_params=engine_request.sampling_params,
            mm_items=engine_request.mm_items,
            arrival_time=engine_request.arrival_time,
            cache_salt=engine_request.cache_salt,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def use_structured_output(self) -> bool:
        """Its next step's token bitmask depends on the token sampled this step (engine.core
        builds it once that token is accepted)."""
        return self.sampling_params.structured_outputs is not None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None

    def append_output_token_id(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.req_id!r}, status={self.status.name}, num_tokens={self.num_tokens}, "
                f"num_computed_tokens={self.num_computed_tokens})")
