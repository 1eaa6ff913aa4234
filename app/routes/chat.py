"""POST /v1/chat/completions: validate -> count media vs limits (before any fetch) -> render the
chat template -> fetch + decode media -> Frontend.make_request -> stream (SSE) or collect.

Caller: Litestar (registered by app.server). The request-shape rules that need the server's
settings (tools, response_format, request chat templates) are in `check_chat_options`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import ServerSentEvent

from app.admission import Ticket, body_size
from app.auth import require_api_key
from app.cli import ServerConfig
from app.errors import EngineDeadError
from app.media import check_media_counts, load_media, media_plan
from app.protocol import (ChatCompletionRequest, ChatCompletionResponse, check_stream_options, random_id,
                          to_sampling_params)
from app.responses import chat_response
from app.serving import ServingContext
from app.streaming import ChatStreamFormat, chat_events


def check_chat_options(data: ChatCompletionRequest, config: ServerConfig) -> bool:
    """ValueError for options this server refuses; returns whether tool calls are parsed."""
    if data.response_format is not None and data.response_format.type != "text":
        raise ValueError(f"response_format type {data.response_format.type!r} is not supported (only 'text')")
    if data.chat_template is not None and not config.trust_request_chat_template:
        raise ValueError("chat_template in the request is refused: start the server with "
                         "--trust-request-chat-template to allow it")
    check_stream_options(data)
    if data.top_logprobs is not None and not data.logprobs:
        raise ValueError("top_logprobs requires logprobs to be true")
    choice = data.tool_choice
    if choice == "required" or not isinstance(choice, (str, type(None))):
        raise ValueError("tool_choice 'required' and named tool choice are not supported (use 'auto' or 'none')")
    if not data.tools or choice == "none":
        return False
    if not config.enable_auto_tool_choice:
        raise ValueError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
    return True


def message_dicts(data: ChatCompletionRequest) -> list[dict]:
    return [msgspec.to_builtins(message) for message in data.messages]


async def build_chat_request(data: ChatCompletionRequest, serving: ServingContext, request_id: str,
                             use_tools: bool, ticket: Ticket | None = None) -> tuple[Any, str]:
    """Everything before the engine: limits, template, media, SamplingParams -> (EngineRequest, prompt)."""
    frontend = serving.client.frontend
    check_media_counts(data.messages, serving.config.limits)
    max_tokens = data.max_completion_tokens or data.max_tokens
    num_top = (data.top_logprobs or 0) if data.logprobs else None
    params = to_sampling_params(data, max_n=serving.config.max_n, max_tokens=max_tokens, logprobs=num_top,
                                max_beam_width=serving.config.max_beam_width, max_best_of=serving.config.max_best_of)
    rendered = frontend.render_chat(
        message_dicts(data), tools=[msgspec.to_builtins(t) for t in data.tools] if use_tools else None,
        chat_template=data.chat_template or serving.chat_template,
        add_generation_prompt=data.add_generation_prompt, continue_final_message=data.continue_final_message,
        chat_template_kwargs=data.chat_template_kwargs)
    media = await load_media(rendered.media, serving.fetcher, serving.config.limits,
                             decode_limits=serving.config.decode_limits(),
                             on_fetched=ticket.add_media_bytes if ticket else lambda num_bytes: None,
                             plan=media_plan(frontend, rendered, data.mm_processor_kwargs))
    engine_request = await asyncio.to_thread(frontend.make_request, request_id, rendered.prompt, media, params,
                                             data.mm_processor_kwargs, add_special_tokens=False)
    return engine_request, rendered.prompt


class ChatController(Controller):
    path = "/v1/chat/completions"
    guards = [require_api_key]
    tags = ["chat"]

    @post("", status_code=200)
    async def create(
            self, data: JSONBody[ChatCompletionRequest], serving: NamedDependency[ServingContext], request: Request,
    ) -> Response:
        model = serving.resolve_model(data.model)
        use_tools = check_chat_options(data, serving.config)
        request_id = random_id("chatcmpl")
        serving.check_healthy()
        async with serving.admission.admit(body_size(request)) as ticket:  # 503 before any fetch
            engine_request, prompt = await build_chat_request(data, serving, request_id, use_tools, ticket)
            num_top = (data.top_logprobs or 0) if data.logprobs else None
            tokenizer = serving.client.frontend.tokenizer
            if data.stream:
                outputs = serving.outputs(engine_request, prompt, ticket)
                first = await anext(outputs, None)
                if first is None:
                    raise EngineDeadError("the engine returned no output")
                include_usage = bool(data.stream_options and data.stream_options.include_usage)
                fmt = ChatStreamFormat(request_id=request_id, model=model, n=data.n, use_tools=use_tools,
                                       num_top_logprobs=num_top, include_usage=include_usage, tokenizer=tokenizer)
                return ServerSentEvent(chat_events(fmt, first, outputs))
            [output] = await serving.final_outputs([(engine_request, prompt)], request, ticket)
        body: ChatCompletionResponse = chat_response(request_id, model, output, use_tools=use_tools,
                                                     num_top=num_top, tokenizer=tokenizer)
        return Response(body)
