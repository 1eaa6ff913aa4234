"""One streamed OpenAI request (chat or completions) -> RequestResult with its timings.

Caller: app.benchmark.serve. Time to first token is taken at the first chunk that carries text
(a chat role chunk with empty content does not count); each later text-carrying chunk adds one
inter-token gap. Token counts come from the usage chunk (`stream_options.include_usage`); a server
that sends none is counted by text-carrying chunks, and `has_usage` says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx
import msgspec


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    start_time: float = 0.0       # perf_counter when the request was sent
    ttft: float = 0.0             # seconds to the first text chunk
    latency: float = 0.0          # seconds, request sent -> stream ended (E2E)
    itl: list[float] = field(default_factory=list)  # seconds between text chunks
    prompt_tokens: int = 0
    output_tokens: int = 0
    has_usage: bool = False
    generated_text: str = ""


def chunk_text(chunk: dict, is_chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if not is_chat:
        return choices[0].get("text") or ""
    delta = choices[0].get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")


async def send_request(client: httpx.AsyncClient, url: str, body: bytes, is_chat: bool,
                       headers: dict[str, str]) -> RequestResult:
    """Never raises (but for cancellation): a failure is a RequestResult with success False."""
    result, texts, num_text_chunks = RequestResult(start_time=time.perf_counter()), [], 0
    last = result.start_time
    try:
        async with client.stream("POST", url, content=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:500]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now, chunk = time.perf_counter(), msgspec.json.decode(data)
                if "error" in chunk and not chunk.get("choices"):
                    result.error = f"error in the stream: {chunk['error']}"
                    return result
                if text := chunk_text(chunk, is_chat):
                    if num_text_chunks == 0:
                        result.ttft = now - result.start_time
                    else:
                        result.itl.append(now - last)
                    num_text_chunks, last = num_text_chunks + 1, now
                    texts.append(text)
                if usage := chunk.get("usage"):
                    result.prompt_tokens = usage.get("prompt_tokens") or 0
                    result.output_tokens = usage.get("completion_tokens") or 0
                    result.has_usage = True
    except (httpx.HTTPError, msgspec.DecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - result.start_time
    result.generated_text = "".join(texts)
    if not result.has_usage:
        result.output_tokens = num_text_chunks
    result.success = num_text_chunks > 0 or result.output_tokens > 0
    if not result.success:
        result.error = "the stream ended without any generated text"
    return result
