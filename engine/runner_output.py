"""ModelRunnerOutput: what one model step produced, handed back to the scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.protocol import TokenLogprobs


@dataclass
class ModelRunnerOutput:
    # Requests of this step, in the runner's batch order.
    req_ids: list[str]
    # One list per request: the sampled token, or empty while its prefill is still partial.
    sampled_token_ids: list[list[int]]
    # req_id -> logprobs of the sampled tokens (only for requests that asked for them).
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # req_id -> prompt logprobs of the positions computed this step, in order; the scheduler
    # concatenates chunks and sends them once the prompt is done.
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)
    # req_id -> error message: this request failed in the runner (bad media, encoder error).
    # The scheduler finishes it with FinishReason.ERROR; the other requests are unaffected.
    failed: dict[str, str] = field(default_factory=dict)
