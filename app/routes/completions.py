"""POST /v1/completions: one or more prompts (text or token ids) -> one engine request each,
streamed (SSE, merged as they produce) or collected. Choice index = prompt index * n + i.

Caller: Litestar (registered by app.server).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import ServerSentEvent

from app.auth import require_api_key
from app.protocol import CompletionRequest, check_stream_options, to_sampling_params
from app.responses import completion_response
from app.serving import ServingContext
from app.streaming import CompletionStreamFormat, completion_events


def prompts_of(data: CompletionRequest) -> list[str | list[int]]:
    prompt = data.prompt
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(item, int) for item in prompt):
        return [[item for item in prompt if isinstance(item, int)]]
    if all(isinstance(item, str) for item in prompt) or all(isinstance(item, list) for item in prompt):
        return [item for item in prompt if not isinstance(item, int)]
    raise ValueError("prompt must be a string, a list of strings, a list of token ids, or a list of such lists")


def check_completion_options(data: CompletionRequest) -> None:
    if data.suffix is not None:
        raise ValueError("suffix is not supported")
    if data.max_tokens == 0 and not data.echo:
        raise ValueError("max_tokens must be at least 1 (0 only with echo: the prompt alone, scored)")
    if data.stream and data.prompt_logprobs is not None:
        raise ValueError("prompt_logprobs is not supported with stream (echo with logprobs streams the prompt's)")
    check_stream_options(data)


def scored_only(data: CompletionRequest) -> bool:
    """echo with max_tokens 0: vLLM samples one token to score the prompt and returns the prompt alone."""
    return data.echo and data.max_tokens == 0


async def build_completion_requests(data: CompletionRequest, serving: ServingContext,
                                    request_id: str) -> list[tuple[Any, str | None]]:
    max_tokens = 1 if scored_only(data) else 16 if data.max_tokens is None else data.max_tokens
    # echo with logprobs reports the prompt's too (vLLM: prompt_logprobs defaults to logprobs under echo)
    prompt_logprobs = data.prompt_logprobs if data.prompt_logprobs is not None else (
        data.logprobs if data.echo else None)
    params = to_sampling_params(data, max_n=serving.config.max_n, max_tokens=max_tokens, logprobs=data.logprobs,
                                max_beam_width=serving.config.max_beam_width, max_best_of=serving.config.max_best_of,
                                prompt_logprobs=prompt_logprobs)
    frontend = serving.client.frontend
    return [(await asyncio.to_thread(frontend.make_request, f"{request_id}-{i}", prompt, [], params,
                                     add_special_tokens=data.add_special_tokens, cache_salt=data.cache_salt),
             prompt if isinstance(prompt, str) else None)
            for i, prompt in enumerate(prompts_of(data))]


def echo_texts(data: CompletionRequest, engine_requests: list[tuple[Any, str | None]],
               tokenizer: Any) -> list[str] | None:
    """What echo puts first: the prompt's text as sent, or the decoded tokens the engine runs (a
    token-id prompt, or one truncate_prompt_tokens cut)."""
    if not data.echo:
        return None
    return [text if text is not None and data.truncate_prompt_tokens is None
            else tokenizer.decode(engine_request.prompt_token_ids) for engine_request, text in engine_requests]


class CompletionsController(Controller):
    path = "/v1/completions"
    guards = [require_api_key]
    tags = ["completions"]

    @post("", status_code=200)
    async def create(
            self, data: JSONBody[CompletionRequest], serving: NamedDependency[ServingContext], request: Request,
    ) -> Response:
        check_completion_options(data)
        async with serving.admitted(request, data.model, "cmpl") as (model, request_id, ticket):
            engine_requests = await build_completion_requests(data, serving, request_id)
            tokenizer = serving.client.frontend.tokenizer
            echoes = echo_texts(data, engine_requests, tokenizer)
            if data.stream:
                include_usage = bool(data.stream_options and data.stream_options.include_usage)
                fmt = CompletionStreamFormat(request_id=request_id, model=model, n=data.n, echo_texts=echoes,
                                             num_top_logprobs=data.logprobs, include_usage=include_usage,
                                             tokenizer=tokenizer, scored_only=scored_only(data))
                return ServerSentEvent(completion_events(fmt, [serving.outputs(r, p) for r, p in engine_requests]))
            outputs = await serving.final_outputs(engine_requests, request, ticket)
        return Response(completion_response(request_id, model, int(time.time()), outputs, n=data.n,
                                            echo_texts=echoes, num_top=data.logprobs, tokenizer=tokenizer,
                                            scored_only=scored_only(data), return_token_ids=data.return_token_ids))
