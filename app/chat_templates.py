"""Bundled chat templates: resolve `--chat-template` (file, bare name, or inline Jinja) and pick a
default by architecture when the tokenizer ships none.

Caller: app.cli (the flag) and app.server (the fallback once the tokenizer is loaded). The
templates live in the top-level `chat_templates` package (data only, shipped as package data), so
editable and regular installs find them the same way.
"""

from __future__ import annotations

import pathlib

import chat_templates

TEMPLATES_DIR = pathlib.Path(chat_templates.__file__).resolve().parent

# HF `architectures[0]` -> bundled template name.
DEFAULT_BY_ARCHITECTURE = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
    "Qwen2ForCausalLM": "qwen2_5_tools",
    "InternVLChatModel": "internvl2_5",
    "InternVLForConditionalGeneration": "internvl2_5",
}


def bundled_names() -> list[str]:
    return sorted(path.stem for path in TEMPLATES_DIR.glob("*.jinja"))


def load_bundled(name: str) -> str:
    path = TEMPLATES_DIR / f"{name}.jinja"
    if not path.is_file():
        raise ValueError(f"--chat-template: no bundled template {name!r} (bundled: {', '.join(bundled_names())})")
    return path.read_text(encoding="utf-8")


def resolve_chat_template(value: str) -> str:
    """A file path, a bundled name ("qwen2_vl" or "qwen2_vl.jinja"), or the template text itself."""
    stem = value[:-len(".jinja")] if value.endswith(".jinja") else value
    if stem in bundled_names():
        return load_bundled(stem)
    if "{{" in value or "{%" in value:
        return value  # inline Jinja; checked first because a long one-line template overflows stat()
    path = pathlib.Path(value).expanduser()
    if "\n" not in value and len(value) < 4096 and path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(f"--chat-template: {value!r} is not a file, a bundled template name "
                     f"({', '.join(bundled_names())}) or inline Jinja")


def default_chat_template(architecture: str) -> str | None:
    name = DEFAULT_BY_ARCHITECTURE.get(architecture)
    return load_bundled(name) if name else None
