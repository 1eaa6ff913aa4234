"""What the offline API (LLM) and the async client (HTTP app) hand their callers: vLLM's
RequestOutput / CompletionOutput / Logprob shapes, field names unchanged.

Built by engine.detokenizer from the core's EngineOutputs; outputs are cumulative (the text and
token ids of a completion so far), the app computes stream deltas from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None            # 1-based rank in the full distribution
    decoded_token: str | None = None   # the token alone, decoded


# One dict per position: token id -> Logprob (the sampled token plus the top-k).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int                          # which of the request's n completions
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None    # sum of the sampled tokens' logprobs (None if not asked)
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None    # "stop" | "length" | "abort" | "error" | None (running)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0          # prompt tokens served from the prefix cache
    num_image_tokens: int = 0           # prompt positions filled by image embeddings
    num_video_tokens: int = 0
    error: str | None = None            # set when the request failed (bad media, engine error)
    metrics: dict[str, float] = field(default_factory=dict)  # arrival/first-token/finish times
