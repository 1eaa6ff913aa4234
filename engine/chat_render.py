"""OpenAI-format chat messages -> the prompt text (through a Jinja chat template, as transformers'
apply_chat_template renders it) and the media the messages reference, in prompt order.

Used by engine.frontend (LLM.chat and the HTTP chat route). Media are only *referenced* here
(URL or in-memory object); fetching and decoding are the caller's job.

Templates take content in one of two shapes (vLLM's "content format"):
  string  `message['content']` is printed as is -> text parts are joined with "\n"
  openai  the template loops over content parts -> parts are normalised to the HF shapes
          {"type": "text", "text"}, {"type": "image"}, {"type": "video"}
"""

from __future__ import annotations

import json
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any

from vision.inputs import IMAGE, VIDEO

# A template that iterates over a message's content wants the parts, not a string.
_LOOPS_OVER_CONTENT = re.compile(r"for\s+\w+\s+in\s+\w+\s*(\[\s*['\"]content['\"]\s*\]|\.content\b)")
_RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template",
                                       "tokenize", "add_generation_prompt", "continue_final_message"})
# part type -> (modality, key holding the url or object)
_MEDIA_PARTS = {
    "image_url": (IMAGE, "image_url"), "input_image": (IMAGE, "image_url"),
    "image": (IMAGE, "image"), "image_pil": (IMAGE, "image_pil"),
    "video_url": (VIDEO, "video_url"), "video": (VIDEO, "video"),
}
_TEXT_PARTS = ("text", "input_text", "output_text")


@dataclass(frozen=True)
class MediaRef:
    modality: str                 # "image" | "video"
    url: str | None = None        # data:, http(s)://, file:// (fetched by the caller)
    data: object | None = None    # an in-memory PIL image / video frames (offline API)
    uuid: str | None = None       # user-given id (vLLM's multi_modal_uuids)
    detail: str | None = None     # image_url.detail: "low" | "high" | "auto"


@dataclass(frozen=True)
class RenderedChat:
    prompt: str
    media: list[MediaRef] = field(default_factory=list)
    tools_dropped: bool = False   # tools were given but the template left them out of the prompt


def resolve_template_text(chat_template: str) -> str:
    """A path to a template file, or inline Jinja."""
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template  # inline Jinja (a path never holds these; long ones overflow stat())
    if "\n" not in chat_template and len(chat_template) < 4096:
        path = pathlib.Path(chat_template).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise ValueError(f"chat_template: {chat_template[:80]!r} is neither a file nor inline Jinja")


def wants_content_parts(template: str) -> bool:
    return _LOOPS_OVER_CONTENT.search(template) is not None


CONTENT_FORMATS = ("auto", "string", "openai")


def render_chat(tokenizer, messages: list[dict], *, chat_template: str | None = None, tools=None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                chat_template_kwargs: dict | None = None, content_format: str = "auto") -> RenderedChat:
    """`content_format` (--chat-template-content-format): string, openai, or auto (detected from
    the template)."""
    template = resolve_template_text(chat_template) if chat_template else _tokenizer_template(tokenizer)
    extra = dict(chat_template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(extra))
    if reserved:
        raise ValueError(f"chat_template_kwargs: {', '.join(reserved)} cannot be set there")
    if not messages:
        raise ValueError("messages: at least one message is required")
    media: list[MediaRef] = []
    if content_format not in CONTENT_FORMATS:
        raise ValueError(f"--chat-template-content-format: must be one of {', '.join(CONTENT_FORMATS)}, "
                         f"got {content_format!r}")
    parts_wanted = wants_content_parts(template) if content_format == "auto" else content_format == "openai"
    conversation = [_normalize_message(m, parts_wanted, media) for m in messages]

    def apply(tools_to_render) -> str:
        return tokenizer.apply_chat_template(
            conversation, tools=tools_to_render, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message, **extra)

    prompt = apply(tools)
    # A template that never reads `tools` (Qwen2-VL's, for one) renders the same text without them.
    return RenderedChat(prompt=prompt, media=media, tools_dropped=bool(tools) and prompt == apply(None))


def _tokenizer_template(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ValueError("this model's tokenizer has no chat template; pass chat_template "
                         "(--chat-template) to use the chat API")
    return template


def _normalize_message(message: dict, parts_wanted: bool, media: list[MediaRef]) -> dict:
    if not isinstance(message, dict) or "role" not in message:
        raise ValueError(f"messages: each message needs a 'role', got {message!r:.80}")
    normalized = {key: value for key, value in message.items() if value is not None}
    content = message.get("content")
    if isinstance(content, list):
        parts = [_normalize_part(part, media) for part in content]
        normalized["content"] = parts if parts_wanted else "\n".join(
            p["text"] for p in parts if p["type"] == "text")
    elif content is not None and not isinstance(content, str):
        raise ValueError(f"messages: content must be a string or a list of parts, got {type(content).__name__}")
    if message.get("tool_calls"):
        normalized["tool_calls"] = [_tool_call_for_template(call) for call in message["tool_calls"]]
    return normalized


def _normalize_part(part: Any, media: list[MediaRef]) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    part_type = part.get("type") if isinstance(part, dict) else None
    if part_type in _TEXT_PARTS:
        return {"type": "text", "text": part.get("text", "")}
    if part_type in _MEDIA_PARTS:
        modality, key = _MEDIA_PARTS[part_type]
        media.append(_media_ref(modality, part.get(key), part))
        return {"type": modality}
    raise ValueError(f"messages: unsupported content part type {part_type!r} "
                     f"(supported: {', '.join(_TEXT_PARTS + tuple(_MEDIA_PARTS))})")


def _media_ref(modality: str, value: Any, part: dict) -> MediaRef:
    uuid = part.get("uuid")
    if isinstance(value, dict):  # {"url": ..., "detail": ...}
        if not isinstance(value.get("url"), str):
            raise ValueError(f"messages: a {modality} part needs a url")
        return MediaRef(modality, url=value["url"], uuid=uuid, detail=value.get("detail", part.get("detail")))
    if isinstance(value, str):
        return MediaRef(modality, url=value, uuid=uuid, detail=part.get("detail"))
    if value is None:
        raise ValueError(f"messages: a {modality} part has no data")
    return MediaRef(modality, data=value, uuid=uuid, detail=part.get("detail"))


def _tool_call_for_template(call: dict) -> dict:
    """OpenAI sends arguments as a JSON string; templates (Qwen2.5, Hermes) print them as JSON
    objects, so parse them (vLLM does the same)."""
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"messages: tool call arguments are not valid JSON: {exc}") from None
    return {**call, "function": function}
