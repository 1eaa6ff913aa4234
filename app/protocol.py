"""The OpenAI wire format (plus vLLM's documented extras) as msgspec Structs.

Caller: the route handlers in app/routes/*, which let Litestar decode request bodies into these
Structs (a malformed body is a msgspec ValidationError -> 400) and encode the responses. Bounds
that only depend on the request live here as `Meta` constraints, so they also appear in the
OpenAPI schema; bounds that depend on the server (the `n` cap) are checked in
`to_sampling_params`. Conversion to `engine.SamplingParams` happens here and nowhere else.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from app.structured_outputs import structured_outputs_of
from engine.sampling_params import MAX_LENGTH_PENALTY, SamplingParams, StructuredOutputsParams

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_BIASED_TOKENS = 300_000   # logit_bias / allowed_token_ids entries (more than any vocabulary)

StopString = Annotated[str, Meta(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
Stop = StopString | Annotated[list[StopString], Meta(max_length=MAX_STOP_STRINGS)] | None
TokenId = Annotated[int, Meta(ge=0, lt=2 ** 31)]
Seed = Annotated[int, Meta(ge=-(2 ** 63), le=2 ** 63 - 1)]
PositiveInt = Annotated[int, Meta(ge=1, lt=2 ** 31)]
NonNegativeInt = Annotated[int, Meta(ge=0, lt=2 ** 31)]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- chat messages


class ImageURL(Struct, kw_only=True):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class VideoURL(Struct, kw_only=True):
    url: str


class InputAudio(Struct, kw_only=True):
    data: str = ""
    format: str = ""


class TextPart(Struct, tag="text", tag_field="type", kw_only=True):
    text: str


class ImageURLPart(Struct, tag="image_url", tag_field="type", kw_only=True):
    image_url: ImageURL
    uuid: str | None = None


class VideoURLPart(Struct, tag="video_url", tag_field="type", kw_only=True):
    video_url: VideoURL
    uuid: str | None = None


class InputAudioPart(Struct, tag="input_audio", tag_field="type", kw_only=True):
    """Accepted by the decoder only so that the route can refuse it with a clear message."""

    input_audio: InputAudio


ContentPart = TextPart | ImageURLPart | VideoURLPart | InputAudioPart


class FunctionCall(Struct, kw_only=True):
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's shape)


class ToolCall(Struct, kw_only=True):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(Struct, kw_only=True, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(Struct, kw_only=True, omit_defaults=True):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Struct, kw_only=True):
    # `type` first: chat templates render tools with tojson in field order, as vLLM's model does.
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(Struct, kw_only=True):
    name: str


class NamedToolChoice(Struct, kw_only=True):
    function: NamedFunction
    type: Literal["function"] = "function"


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(Struct, kw_only=True):
    type: str                                    # text | json_object | json_schema
    json_schema: dict[str, Any] | None = None    # {"name", "schema", "strict", "description"}


# ---------------------------------------------------------------- requests


class SamplingFields(Struct, kw_only=True):
    """Fields shared by /v1/chat/completions and /v1/completions (vLLM's names)."""

    model: str | None = None
    n: PositiveInt = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=-1, lt=2 ** 31)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=100.0)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    seed: Seed | None = None
    user: str | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Meta(ge=0, lt=2 ** 31)] = 0
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    # OpenAI's logit_bias: token id (a string key) -> bias, clamped to [-100, 100] as vLLM does;
    # vLLM's allowed_token_ids: only these may be sampled
    logit_bias: Annotated[dict[str, float], Meta(max_length=MAX_BIASED_TOKENS)] | None = None
    allowed_token_ids: Annotated[list[TokenId], Meta(min_length=1, max_length=MAX_BIASED_TOKENS)] | None = None
    # vLLM's: keep the prompt's last k tokens (-1: the last max_model_len); text prompts only
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1, lt=2 ** 31)] | None = None
    # vLLM's: requests with different salts never share prefix-cache blocks
    cache_salt: Annotated[str, Meta(min_length=1, max_length=1024)] | None = None
    # vLLM's: only 0 here (first come, first served; vLLM needs --scheduling-policy priority for others)
    priority: int = 0
    # vLLM's: the prompt's and each choice's token ids in the response (collect mode)
    return_token_ids: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    mm_processor_kwargs: dict[str, Any] | None = None
    # Output constraints (app.structured_outputs): one of these forms per request.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: str | dict[str, Any] | None = None        # deprecated: structured_outputs.json
    guided_regex: str | None = None                         # deprecated: structured_outputs.regex
    guided_choice: list[str] | None = None                  # deprecated: structured_outputs.choice
    guided_grammar: str | None = None                       # deprecated: structured_outputs.grammar
    guided_whitespace_pattern: str | None = None            # deprecated: structured_outputs.whitespace_pattern
    guided_decoding_backend: str | None = None              # deprecated: --structured-outputs-config
    # Beam search (vLLM's extra body): n is the beam width.
    use_beam_search: bool = False
    length_penalty: Annotated[float, Meta(ge=-MAX_LENGTH_PENALTY, le=MAX_LENGTH_PENALTY)] = 1.0
    early_stopping: bool | Literal["never"] = False


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, lt=2 ** 31)] | None = None  # at most --max-logprobs
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # vLLM extensions: echo puts the last message's text before the reply when that message has the
    # reply's role (an assistant prefix continued); prompt_logprobs: top log-probs of each prompt token
    # (echo with top_logprobs implies it), in the response's `prompt_logprobs`
    echo: bool = False
    prompt_logprobs: Annotated[int, Meta(ge=0, lt=2 ** 31)] | None = None
    # vLLM's: the tokenizer's special tokens (a BOS) on top of the template's; off, as the template writes them
    add_special_tokens: bool = False


# str | list[str] | list[int] | list[list[int]]; msgspec allows one list type per union, so the
# list's items are a union and `prompts_of` (app.routes.completions) checks they agree.
PromptInput = (
    Annotated[str, Meta(max_length=10_000_000)]
    | Annotated[list[str | TokenId | Annotated[list[TokenId], Meta(min_length=1)]], Meta(min_length=1)]
)


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: PromptInput
    # 0 only with echo: the prompt alone, scored (vLLM's echo without generation; lm-eval's loglikelihood)
    max_tokens: NonNegativeInt | None = None
    echo: bool = False
    logprobs: Annotated[int, Meta(ge=0, lt=2 ** 31)] | None = None  # at most --max-logprobs
    # vLLM extension: top log-probs of each prompt token (the first has none); echo with logprobs implies it
    prompt_logprobs: Annotated[int, Meta(ge=0, lt=2 ** 31)] | None = None
    # vLLM's: the tokenizer's special tokens (a BOS) around a text prompt
    add_special_tokens: bool = True
    suffix: str | None = None
    best_of: PositiveInt | None = None


def check_stream_options(request: SamplingFields) -> None:
    if request.stream and request.return_token_ids:
        raise ValueError("return_token_ids is supported without stream only")
    if request.stream_options is None:
        return
    if not request.stream:
        raise ValueError("stream_options can only be given when stream is true")
    if request.stream_options.continuous_usage_stats:
        raise ValueError("stream_options.continuous_usage_stats is not supported (use include_usage)")


def to_sampling_params(request: SamplingFields, *, max_n: int, max_tokens: int | None,
                       logprobs: int | None, max_beam_width: int = 8, max_best_of: int = 16,
                       prompt_logprobs: int | None = None) -> SamplingParams:
    """Request fields -> SamplingParams (ValueError on values bounded by the server)."""
    if request.priority != 0:
        raise ValueError(f"priority {request.priority}: this server schedules first come, first served "
                         f"(vLLM, too, refuses a priority without --scheduling-policy priority)")
    if request.n > max_n:
        raise ValueError(f"n must be at most {max_n} on this server, got {request.n}")
    check_beam_search_and_best_of(request, max_beam_width, max_best_of)
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    given: dict[str, Any] = {
        "temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k,
        "min_p": request.min_p, "repetition_penalty": request.repetition_penalty,
        "presence_penalty": request.presence_penalty, "frequency_penalty": request.frequency_penalty,
    }
    params = SamplingParams(
        n=request.n, seed=request.seed, stop=stop or None, stop_token_ids=request.stop_token_ids,
        ignore_eos=request.ignore_eos, max_tokens=max_tokens, min_tokens=request.min_tokens,
        logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=request.skip_special_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output,
        structured_outputs=structured_outputs_of(request),
        logit_bias=logit_bias_of(request), allowed_token_ids=request.allowed_token_ids,
        truncate_prompt_tokens=request.truncate_prompt_tokens,
        spaces_between_special_tokens=request.spaces_between_special_tokens,
        use_beam_search=request.use_beam_search, length_penalty=request.length_penalty,
        early_stopping=request.early_stopping, best_of=getattr(request, "best_of", None),
        **{name: value for name, value in given.items() if value is not None},
    )
    if request.use_beam_search and request.temperature is None:   # beam search is deterministic
        params = msgspec.structs.replace(params, temperature=0.0)
    return params.validate()


def logit_bias_of(request: SamplingFields) -> dict[int, float] | None:
    """logit_bias with integer keys and biases clamped to [-100, 100] (vLLM's reading)."""
    if not request.logit_bias:
        return None
    bias = {}
    for key, value in request.logit_bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        bias[token_id] = min(100.0, max(-100.0, value))
    return bias


def check_beam_search_and_best_of(request: SamplingFields, max_beam_width: int, max_best_of: int) -> None:
    """The server's caps (--max-beam-width, --max-best-of), before any media is fetched."""
    if request.use_beam_search and request.n > max_beam_width:
        raise ValueError(f"n (the beam width with use_beam_search) must be at most {max_beam_width} on this "
                         f"server, got {request.n}")
    best_of = getattr(request, "best_of", None)
    if best_of is None:
        return
    if best_of > max_best_of:
        raise ValueError(f"best_of must be at most {max_best_of} on this server, got {best_of}")
    if request.stream:
        raise ValueError("best_of is not supported with stream (as OpenAI's API)")


# ---------------------------------------------------------------- responses


class PromptTokensDetails(Struct, kw_only=True):
    cached_tokens: int = 0
    image_tokens: int = 0
    video_tokens: int = 0


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct, kw_only=True):
    content: list[TokenLogprob]


class AssistantMessage(Struct, kw_only=True):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = []


class ChatCompletionChoice(Struct, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None          # return_token_ids


class ChatCompletionResponse(Struct, kw_only=True):
    id: str
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None   # vLLM's shape (CompletionChoice's)
    prompt_token_ids: list[int] | None = None   # return_token_ids
    object: str = "chat.completion"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))


class ToolCallDelta(Struct, kw_only=True):
    index: int
    id: str
    function: FunctionCall
    type: str = "function"


class DeltaMessage(Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatCompletionChunkChoice(Struct, kw_only=True):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(Struct, kw_only=True):
    id: str
    model: str
    created: int
    choices: list[ChatCompletionChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


class CompletionLogprobs(Struct, kw_only=True):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class PromptLogprob(Struct, kw_only=True):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    stop_reason: int | str | None = None
    # vLLM's shape: per prompt position, None for the first, else token id -> its log-prob (collect mode)
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None
    prompt_token_ids: list[int] | None = None   # return_token_ids
    token_ids: list[int] | None = None


class CompletionResponse(Struct, kw_only=True):
    id: str
    model: str
    created: int
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"


# ---------------------------------------------------------------- models, tokenize, errors


class ModelCard(Struct, kw_only=True):
    id: str
    root: str
    max_model_len: int
    object: str = "model"
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    owned_by: str = "vlserve"
    parent: str | None = None
    # What requests that leave these sampling fields unset get (--generation-config; vlserve's extra).
    default_sampling_params: dict[str, Any] = {}


class ModelList(Struct, kw_only=True):
    data: list[ModelCard]
    object: str = "list"


class TokenizeRequest(Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None


class TokenizeResponse(Struct, kw_only=True):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(Struct, kw_only=True):
    tokens: Annotated[list[TokenId], Meta(max_length=1_000_000)]
    model: str | None = None


class DetokenizeResponse(Struct, kw_only=True):
    prompt: str


class ErrorInfo(Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(Struct, kw_only=True):
    error: ErrorInfo


class VersionResponse(Struct, kw_only=True):
    version: str
