"""Hermes-style tool calls (Qwen2.5): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
in the model's text -> OpenAI `tool_calls`, with the text outside the tags as `content`.

Caller: app.streaming (one `HermesToolParser` per choice). It is streaming-aware: `feed` takes
each text delta and returns only content that can no longer turn into a tag, so no partial
`<tool_c` ever leaks into `content`; a call is emitted whole once its closing tag arrives.
The non-streaming path (`parse`) runs the same state machine on the full text, so both paths
agree. A body that is not valid JSON with a "name" is returned as content, tags included.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from app.protocol import FunctionCall, ToolCall

START_TAG = "<tool_call>"
END_TAG = "</tool_call>"


def new_tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _as_tool_call(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    arguments_json = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=new_tool_call_id(), function=FunctionCall(name=obj["name"], arguments=arguments_json))


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


@dataclass
class HermesToolParser:
    buffer: str = ""               # text held back: a possible partial tag, or an open call's body
    is_in_call: bool = False
    tool_calls: list[ToolCall] = field(default_factory=list)

    def feed(self, delta: str) -> tuple[str, list[ToolCall]]:
        """A text delta -> (content safe to emit now, tool calls completed by this delta)."""
        self.buffer += delta
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self.is_in_call:
                start = self.buffer.find(START_TAG)
                if start < 0:
                    keep = _partial_tag_suffix(self.buffer, START_TAG)
                    self._add_content(content, self.buffer[:len(self.buffer) - keep], calls)
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                self._add_content(content, self.buffer[:start], calls)
                self.buffer, self.is_in_call = self.buffer[start + len(START_TAG):], True
            end = self.buffer.find(END_TAG)
            if end < 0:
                break
            body, self.buffer, self.is_in_call = self.buffer[:end], self.buffer[end + len(END_TAG):], False
            call = _as_tool_call(body)
            if call is None:
                content.append(START_TAG + body + END_TAG)
            else:
                calls.append(call)
        return self._emit("".join(content), calls)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """End of text: an unterminated call is parsed if it is complete JSON, else it is content."""
        rest, self.buffer = self.buffer, ""
        if not self.is_in_call:
            return self._emit(rest, [])
        self.is_in_call = False
        call = _as_tool_call(rest)
        return self._emit("", [call]) if call else self._emit(START_TAG + rest, [])

    def _add_content(self, content: list[str], text: str, calls: list[ToolCall]) -> None:
        if not (self.tool_calls or calls) or text.strip():
            content.append(text)  # whitespace between or after calls is formatting, not content

    def _emit(self, content: str, calls: list[ToolCall]) -> tuple[str, list[ToolCall]]:
        if (self.tool_calls or calls) and not content.strip():
            content = ""
        self.tool_calls.extend(calls)
        return content, calls


def parse(text: str) -> tuple[str | None, list[ToolCall]]:
    """Full model text -> (content or None, tool calls)."""
    parser = HermesToolParser()
    content, calls = parser.feed(text)
    tail, tail_calls = parser.finish()
    content += tail
    if parser.tool_calls and not content.strip():
        content = ""
    return (content or None), calls + tail_calls
