"""POST /v1/chat/completions: validate -> count media vs limits (before any fetch) -> render the
chat template -> fetch + decode media -> Frontend.make_request -> stream (SSE) or collect.

Caller: Litestar (registered by app.server). The request-shape rules that need the server's
settings (tools, response_format, request chat templates) are in `check_chat_options`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import ServerSentEvent

from app.admission import Ticket
from app.auth import require_api_key
from app.errors import EngineDeadError
from app.media import check_media_counts, load_media, media_plan
from app.protocol import (ChatCompletionRequest, ChatCompletionResponse, TextPart, check_stream_options,
                          to_sampling_params)
from app.responses import chat_response
from app.server_config import ServerConfig
from app.serving import ServingContext
from app.streaming import ChatStreamFormat, chat_events

logger = logging.getLogger("vlserve.chat")


def check_chat_options(data: ChatCompletionRequest, config: ServerConfig) -> bool:
    """ValueError for options this server refuses; returns whether tool calls are parsed."""
    if data.chat_template is not None and not config.trust_request_chat_template:
        raise ValueError("chat_template in the request is refused: start the server with "
                         "--trust-request-chat-template to allow it")
    check_stream_options(data)
    if data.top_logprobs is not None and not data.logprobs:
        raise ValueError("top_logprobs requires logprobs to be true")
    if data.stream and data.prompt_logprobs is not None:
        raise ValueError("prompt_logprobs is not supported with stream")
    choice = data.tool_choice
    if not data.tools or choice == "none":
        return False
    if choice == "required" or not isinstance(choice, (str, type(None))):
        return True   # the output is constrained to tool calls (app.structured_outputs): no parser flags needed
    if not config.enable_auto_tool_choice:
        raise ValueError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
    return True


@functools.lru_cache(maxsize=8)
def warn_tools_dropped(template: str) -> None:
    """Logged once per template (the cache is the "once")."""
    logger.warning("a request's tools were dropped: the chat template in use does not render tools, so the "
                   "model never sees them. For Qwen2.5-VL use --chat-template qwen2_5_vl_tools (README: "
                   "'Tools'); template starts %r", template[:60])


def echoed_text(data: ChatCompletionRequest, role: str) -> str:
    """echo (vLLM): the last message's text when it has the reply's role (its text parts joined by
    newlines), else nothing."""
    last = data.messages[-1]
    if not data.echo or last.role != role or last.content is None:
        return ""
    if isinstance(last.content, str):
        return last.content
    return "\n".join(part.text for part in last.content if isinstance(part, TextPart))


def message_dicts(data: ChatCompletionRequest) -> list[dict]:
    return [msgspec.to_builtins(message) for message in data.messages]


async def build_chat_request(data: ChatCompletionRequest, serving: ServingContext, request_id: str,
                             use_tools: bool, ticket: Ticket | None = None) -> tuple[Any, str]:
    """Everything before the engine: limits, template, media, SamplingParams -> (EngineRequest, prompt)."""
    frontend = serving.client.frontend
    check_media_counts(data.messages, serving.config.limits)
    max_tokens = data.max_completion_tokens or data.max_tokens
    num_top = (data.top_logprobs or 0) if data.logprobs else None
    # vLLM: echo with top_logprobs reports the prompt's too
    prompt_logprobs = data.prompt_logprobs if data.prompt_logprobs is not None else (
        data.top_logprobs if data.echo else None)
    params = to_sampling_params(data, max_n=serving.config.max_n, max_tokens=max_tokens, logprobs=num_top,
                                max_beam_width=serving.config.max_beam_width, max_best_of=serving.config.max_best_of,
                                prompt_logprobs=prompt_logprobs)
    rendered = frontend.render_chat(
        message_dicts(data), tools=[msgspec.to_builtins(t) for t in data.tools] if use_tools else None,
        chat_template=data.chat_template or serving.chat_template,
        add_generation_prompt=data.add_generation_prompt, continue_final_message=data.continue_final_message,
        chat_template_kwargs=data.chat_template_kwargs, content_format=serving.config.chat_template_content_format)
    if rendered.tools_dropped:
        warn_tools_dropped(data.chat_template or serving.chat_template or "the model's own chat template")
    media = await load_media(rendered.media, serving.fetcher, serving.config.limits,
                             decode_limits=serving.config.decode_limits(),
                             on_fetched=ticket.add_media_bytes if ticket else lambda num_bytes: None,
                             plan=media_plan(frontend, rendered, data.mm_processor_kwargs),
                             pool=serving.image_decoder)
    engine_request = await asyncio.to_thread(frontend.make_request, request_id, rendered.prompt, media, params,
                                             data.mm_processor_kwargs, add_special_tokens=data.add_special_tokens,
                                             cache_salt=data.cache_salt)
    return engine_request, rendered.prompt


class ChatController(Controller):
    path = "/v1/chat/completions"
    guards = [require_api_key]
    tags = ["chat"]

    @post("", status_code=200)
    async def create(
            self, data: JSONBody[ChatCompletionRequest], serving: NamedDependency[ServingContext], request: Request,
    ) -> Response:
        use_tools = check_chat_options(data, serving.config)
        async with serving.admitted(request, data.model, "chatcmpl") as (model, request_id, ticket):
            engine_request, prompt = await build_chat_request(data, serving, request_id, use_tools, ticket)
            num_top = (data.top_logprobs or 0) if data.logprobs else None
            tokenizer = serving.client.frontend.tokenizer
            # vLLM's rule: --response-role after a generation prompt, else the last message's role.
            role = serving.config.response_role if data.add_generation_prompt else data.messages[-1].role
            if data.stream:
                outputs = serving.outputs(engine_request, prompt, ticket)
                first = await anext(outputs, None)
                if first is None:
                    raise EngineDeadError("the engine returned no output")
                include_usage = bool(data.stream_options and data.stream_options.include_usage)
                fmt = ChatStreamFormat(request_id=request_id, model=model, n=data.n, use_tools=use_tools,
                                       num_top_logprobs=num_top, include_usage=include_usage, tokenizer=tokenizer,
                                       role=role, echo=echoed_text(data, role))
                return ServerSentEvent(chat_events(fmt, first, outputs))
            [output] = await serving.final_outputs([(engine_request, prompt)], request, ticket)
        body: ChatCompletionResponse = chat_response(request_id, model, output, use_tools=use_tools,
                                                     num_top=num_top, tokenizer=tokenizer, role=role,
                                                     echo=echoed_text(data, role),
                                                     return_token_ids=data.return_token_ids)
        return Response(body)
