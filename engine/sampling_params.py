"""SamplingParams: how one request is decoded. Names, defaults and meanings are vLLM's.

Validated once, in `validate()`, by whoever builds it (LLM.generate, the HTTP routes); every bad
value raises ValueError naming the field.

Unset is not the same as default: temperature, top_p, top_k, min_p and repetition_penalty left
out (or given as None) read as vLLM's neutral value but are listed in `unset_fields`, so that the
engine can fill them from the model's generation_config.json (`with_defaults`, called by
engine.frontend), as vLLM's server and transformers' `generate` do.
"""

from __future__ import annotations

import math

import msgspec
from msgspec.structs import force_setattr

from engine.structured_output.params import GuidedDecodingParams, StructuredOutputsParams

__all__ = ["GuidedDecodingParams", "SamplingParams", "StructuredOutputsParams"]

MAX_LOGPROBS = 20  # the default of --max-logprobs (the bound is the server's, checked in engine.frontend)
# The fields a generation config may supply, with the value they take when nothing supplies one.
NEUTRAL_VALUES: dict[str, float | int] = {
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
}
MAX_LENGTH_PENALTY = 10.0


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None (the default): unset -> the model's generation config, else NEUTRAL_VALUES (see __post_init__).
    repetition_penalty: float = None  # type: ignore[assignment]
    temperature: float = None  # type: ignore[assignment]
    top_p: float = None  # type: ignore[assignment]
    top_k: int = None  # type: ignore[assignment]  # 0 or -1: off
    min_p: float = None  # type: ignore[assignment]
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # top-k logprobs per generated token (plus the sampled one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    # Beam search (vLLM's pre-0.6 names; LLM.beam_search and the servers' use_beam_search set them):
    # n is the beam width; the search is transformers' generate(num_beams=n, do_sample=False).
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False   # True, False or "never" (transformers' meaning)
    # Completions API: sample best_of, return the n with the highest cumulative log-prob.
    best_of: int | None = None
    # One output constraint (JSON schema, regex, choice, grammar, ...); see engine/structured_output.
    structured_outputs: StructuredOutputsParams | None = None
    # OpenAI's logit_bias (token id -> added to its logit before sampling; the HTTP routes clamp it to
    # [-100, 100] as vLLM does) and vLLM's allowed_token_ids (only these can be sampled). Token ids are
    # checked against the vocabulary by engine.frontend.
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    # vLLM's: keep only the prompt's last k tokens (-1: the last max_model_len); text prompts only
    truncate_prompt_tokens: int | None = None
    # Names of NEUTRAL_VALUES fields the caller left unset; filled in by __post_init__.
    unset_fields: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Runs on construction, on msgspec decode and on structs.replace: a field holding None is
        # unset (it takes the neutral value); a field once unset that now holds a value other than
        # the neutral one was set by `replace`.
        unset = {name for name in self.unset_fields if getattr(self, name) in (None, NEUTRAL_VALUES[name])}
        for name, neutral in NEUTRAL_VALUES.items():
            if getattr(self, name) is None:
                force_setattr(self, name, neutral)
                unset.add(name)
        force_setattr(self, "unset_fields", frozenset(unset))

    @classmethod
    def from_optional(cls, **kwargs) -> "SamplingParams":
        """vLLM's constructor for optional values: a None argument means the default."""
        return cls(**{name: value for name, value in kwargs.items() if value is not None})

    def with_defaults(self, defaults: dict) -> "SamplingParams":
        """The unset fields filled from `defaults` (a generation config's sampling values, vLLM's
        `ModelConfig.get_diff_sampling_param()` names); the given ones win. Nothing is unset after."""
        filled = {name: defaults[name] for name in self.unset_fields if defaults.get(name) is not None}
        return msgspec.structs.replace(self, unset_fields=frozenset(), **filled)

    def validate(self) -> "SamplingParams":
        checks = [
            (self.n >= 1, "n", "must be at least 1"),
            (self.temperature >= 0.0, "temperature", "must be non-negative"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= -1, "top_k", "must be -1 or 0 (disabled) or at least 1"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (0.0 < self.repetition_penalty <= 2.0 ** 31, "repetition_penalty", "must be positive"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.min_tokens >= 0, "min_tokens", "must be non-negative"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             "must not exceed max_tokens"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs", "must be non-negative"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs", "must be non-negative"),
            (self.seed is None or -(2 ** 63) <= self.seed < 2 ** 64, "seed", "must fit in 64 bits"),
            (self.truncate_prompt_tokens in (None, -1) or self.truncate_prompt_tokens >= 1,
             "truncate_prompt_tokens", "must be -1 or at least 1"),
        ]
        for ok, field, message in checks:
            if not ok:
                raise ValueError(f"{field} {message}, got {getattr(self, field)!r}")
        if self.stop is not None and any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must not be empty")
        if self.logit_bias and not all(math.isfinite(bias) for bias in self.logit_bias.values()):
            raise ValueError(f"logit_bias values must be finite, got {self.logit_bias!r}")
        if self.structured_outputs is not None:
            self.structured_outputs.validate()
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of must be at least n ({self.n}), got {self.best_of}")
        if self.use_beam_search:
            self._validate_beam_search()
        return self

    def _validate_beam_search(self) -> None:
        """Beam search is deterministic (beam sampling is not built) and decodes on raw log-probs."""
        if not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:   # len ** lp stays finite
            raise ValueError(f"length_penalty must be in [-{MAX_LENGTH_PENALTY}, {MAX_LENGTH_PENALTY}], "
                             f"got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or \"never\", got {self.early_stopping!r}")
        refused = [
            (self.temperature != 0.0, "temperature", "must be 0 with use_beam_search (beam sampling is not supported)"),
            (self.best_of not in (None, self.n), "best_of", "must equal n (the beam width) with use_beam_search"),
            (bool(self.stop), "stop", "strings are not supported with use_beam_search (stop_token_ids are)"),
            (self.prompt_logprobs is not None, "prompt_logprobs", "is not supported with use_beam_search"),
            (self.top_p != 1.0 or self.effective_top_k or self.min_p != 0.0, "top_p",
             "top_k and min_p do not apply to beam search; leave them unset"),
            (self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty,
             "repetition_penalty", "presence_penalty and frequency_penalty are not supported with use_beam_search"),
            (bool(self.logit_bias) or self.allowed_token_ids is not None, "logit_bias",
             "and allowed_token_ids are not supported with use_beam_search"),
        ]
        for bad, field, message in refused:
            if bad:
                raise ValueError(f"{field} {message}, got {getattr(self, field)!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def effective_top_k(self) -> int:
        return 0 if self.top_k in (-1, 0) else self.top_k
