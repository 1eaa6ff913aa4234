"""Cumulative RequestOutputs -> the data lines of an OpenAI SSE stream.

Caller: app.routes.chat / app.routes.completions wrap these generators in Litestar's
`ServerSentEvent`. Chat: one role chunk per choice, then content / tool-call deltas, a chunk
carrying finish_reason, an optional usage chunk (`stream_options.include_usage`), then `[DONE]`.
An error after the stream started cannot change the status any more: it is sent as an
`{"error": ...}` event, followed by `[DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from app.errors import EngineDeadError
from app.protocol import (ChatCompletionChunk, ChatCompletionChunkChoice, CompletionChoice, CompletionResponse,
                          DeltaMessage, ErrorInfo, ErrorResponse, ToolCallDelta)
from app.responses import chat_logprobs, completion_logprobs, echoed_prompt, usage_of
from app.tool_parsers.hermes import HermesToolParser

logger = logging.getLogger("vlserve.app")
DONE = "[DONE]"


@dataclass
class ChoiceProgress:
    """How much of one choice's cumulative output has been sent."""

    num_chars: int = 0
    num_tokens: int = 0
    is_done: bool = False
    has_echoed: bool = False   # completions' echo: the prompt went out
    num_echo_chars: int = 0    # its length (logprobs' text_offset counts from the choice's first character)
    tool_parser: HermesToolParser | None = None
    num_tool_calls: int = 0


@dataclass
class ChatStreamFormat:
    request_id: str
    model: str
    n: int
    use_tools: bool
    num_top_logprobs: int | None
    include_usage: bool
    tokenizer: Any
    created: int = field(default_factory=lambda: int(time.time()))
    role: str = "assistant"  # --response-role (or the last message's role without a generation prompt)
    echo: str = ""           # vLLM's chat echo: sent as each choice's first content, after the role

    def chunk(self, choices: list[ChatCompletionChunkChoice], usage=None) -> str:
        body = ChatCompletionChunk(id=self.request_id, model=self.model, created=self.created,
                                   choices=choices, usage=usage)
        return msgspec.json.encode(body).decode()

    def delta_choice(self, completion: Any, progress: ChoiceProgress) -> ChatCompletionChunkChoice | None:
        text, progress.num_chars = completion.text[progress.num_chars:], len(completion.text)
        new_ids = completion.token_ids[progress.num_tokens:]
        new_logprobs = (completion.logprobs or [])[progress.num_tokens:]
        progress.num_tokens = len(completion.token_ids)
        calls: list = []
        finish = None
        if progress.tool_parser is not None:
            text, calls = progress.tool_parser.feed(text)
        if completion.finish_reason is not None and not progress.is_done:
            progress.is_done, finish = True, completion.finish_reason
            if progress.tool_parser is not None:
                tail, tail_calls = progress.tool_parser.finish()
                text, calls = text + tail, calls + tail_calls
                finish = "tool_calls" if progress.tool_parser.tool_calls else finish
        logprobs = None
        if self.num_top_logprobs is not None and completion.logprobs is not None and new_ids:
            logprobs = chat_logprobs(new_ids, new_logprobs, self.num_top_logprobs, self.tokenizer)
        if not (text or calls or finish or logprobs):
            return None
        deltas = [ToolCallDelta(index=progress.num_tool_calls + i, id=c.id, function=c.function)
                  for i, c in enumerate(calls)]
        progress.num_tool_calls += len(calls)
        delta = DeltaMessage(content=text or None, tool_calls=deltas or None)
        return ChatCompletionChunkChoice(index=completion.index, delta=delta, finish_reason=finish,
                                         logprobs=logprobs, stop_reason=completion.stop_reason if finish else None)


def error_event(exc: Exception) -> str:
    status = 503 if isinstance(exc, EngineDeadError) else 400
    kind = "service_unavailable" if status == 503 else "invalid_request_error"
    message = str(exc) if isinstance(exc, (ValueError, EngineDeadError)) else "internal server error"
    if status == 400 and not isinstance(exc, ValueError):
        status, kind = 500, "server_error"
        logger.exception("error in a stream")
    return msgspec.json.encode(ErrorResponse(error=ErrorInfo(message=message, type=kind, code=status))).decode()


async def chat_events(fmt: ChatStreamFormat, first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[str]:
    """`first` was awaited by the handler (so errors before any output are plain HTTP errors)."""
    progress = {i: ChoiceProgress(tool_parser=HermesToolParser() if fmt.use_tools else None) for i in range(fmt.n)}
    for index in range(fmt.n):
        yield fmt.chunk([ChatCompletionChunkChoice(index=index, delta=DeltaMessage(role=fmt.role, content=""))])
    if fmt.echo:
        for index in range(fmt.n):
            yield fmt.chunk([ChatCompletionChunkChoice(index=index, delta=DeltaMessage(content=fmt.echo))])
    last = first
    try:
        output = first
        while output is not None:
            last = output
            choices = [fmt.delta_choice(c, progress[c.index]) for c in output.outputs]
            choices = [c for c in choices if c is not None]
            if choices:
                yield fmt.chunk(choices)
            output = await anext(rest, None)
    except Exception as exc:  # noqa: BLE001 - reported in-band; the status line is already sent
        yield error_event(exc)
        yield DONE
        return
    if fmt.include_usage:
        yield fmt.chunk([], usage=usage_of([last]))
    yield DONE


async def merge_streams(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several output streams as they produce: (stream index, output)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, None, exc))
        await queue.put((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is None:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class CompletionStreamFormat:
    request_id: str
    model: str
    n: int
    echo_texts: list[str] | None
    num_top_logprobs: int | None
    include_usage: bool
    tokenizer: Any
    created: int = field(default_factory=lambda: int(time.time()))
    scored_only: bool = False   # echo with max_tokens 0: the echoed prompt alone (completion_response's)

    def delta_choice(self, prompt_index: int, output: Any, completion: Any,
                     progress: ChoiceProgress) -> CompletionChoice | None:
        """The choice's new text since `progress`; the first one carries the echoed prompt and, when
        logprobs are asked, the prompt's log-probs before the completion's (vLLM's stream shape)."""
        echo, prompt_part = "", None
        text_offset = progress.num_echo_chars + progress.num_chars   # characters this choice has sent
        if self.echo_texts and not progress.has_echoed:
            prompt_part = echoed_prompt(output, self.num_top_logprobs)
            if self.num_top_logprobs is not None and prompt_part is None and completion.finish_reason is None:
                return None   # the prompt's log-probs come with the first token: send nothing before them
            echo, progress.has_echoed = self.echo_texts[prompt_index], True
            progress.num_echo_chars = len(echo)
        text = completion.text[progress.num_chars:]
        new_ids = completion.token_ids[progress.num_tokens:]
        new_logprobs = (completion.logprobs or [])[progress.num_tokens:]
        progress.num_tokens = len(completion.token_ids)
        if self.scored_only:
            text, new_ids, new_logprobs = "", [], []
        progress.num_chars += len(text)
        finish = None
        if completion.finish_reason is not None and not progress.is_done:
            progress.is_done, finish = True, completion.finish_reason
        if not (echo or text or finish):
            return None
        logprobs = None
        if self.num_top_logprobs is not None and (completion.logprobs is not None or prompt_part is not None):
            prompt_ids, prompt_positions = prompt_part if echo and prompt_part else ([], [])
            logprobs = completion_logprobs(prompt_ids + new_ids, prompt_positions + new_logprobs,
                                           self.num_top_logprobs, self.tokenizer, text_offset=text_offset)
        return CompletionChoice(index=prompt_index * self.n + completion.index, text=echo + text,
                                finish_reason=finish, logprobs=logprobs,
                                stop_reason=completion.stop_reason if finish else None)

    def chunk(self, choices: list[CompletionChoice], usage=None) -> str:
        body = CompletionResponse(id=self.request_id, model=self.model, created=self.created,
                                  choices=choices, usage=usage)
        return msgspec.json.encode(body).decode()


async def completion_events(fmt: CompletionStreamFormat, streams: list[AsyncIterator[Any]]) -> AsyncIterator[str]:
    progress: dict[tuple[int, int], ChoiceProgress] = {}
    last: dict[int, Any] = {}
    try:
        async for prompt_index, output in merge_streams(streams):
            last[prompt_index] = output
            choices = [fmt.delta_choice(prompt_index, output, c,
                                        progress.setdefault((prompt_index, c.index), ChoiceProgress()))
                       for c in output.outputs]
            choices = [c for c in choices if c is not None]
            if choices:
                yield fmt.chunk(choices)
    except Exception as exc:  # noqa: BLE001 - reported in-band
        yield error_event(exc)
        yield DONE
        return
    if fmt.include_usage:
        yield fmt.chunk([], usage=usage_of([last[i] for i in sorted(last)]))
    yield DONE
