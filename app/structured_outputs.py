"""The request forms of structured outputs -> one engine StructuredOutputsParams.

Caller: app.protocol.to_sampling_params (chat and completions). Three forms say the same thing:
`response_format` (OpenAI: text, json_object, json_schema), `structured_outputs` (vLLM) and the
legacy top-level `guided_*` fields (vLLM before v0.12; deprecated here, but never ignored: vLLM
since v0.12 drops them silently and the request "fails open" with unconstrained text). More than
one constraint in a request is a ValueError (HTTP 400) naming them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from engine.structured_output.params import StructuredOutputsParams

logger = logging.getLogger(__name__)

LEGACY_CONSTRAINTS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                      "guided_grammar": "grammar"}
LEGACY_OPTIONS = ("guided_whitespace_pattern", "guided_decoding_backend")
_warned: set[str] = set()


def structured_outputs_of(request: Any) -> StructuredOutputsParams | None:
    """The request's one output constraint, or None. `request`: app.protocol.SamplingFields."""
    forms: list[tuple[str, StructuredOutputsParams]] = []
    if request.structured_outputs is not None:
        forms.append(("structured_outputs", request.structured_outputs))
    response_format = _from_response_format(request.response_format)
    if response_format is not None:
        forms.append((f"response_format ({request.response_format.type})", response_format))
    legacy = _from_legacy_fields(request)
    if legacy is not None:
        forms.append(("guided_*", legacy))
    tool_calls = _from_tool_choice(request)
    if tool_calls is not None:
        forms.append((f"tool_choice ({request.tool_choice if isinstance(request.tool_choice, str) else 'named'})",
                       tool_calls))
    if len(forms) > 1:
        raise ValueError(f"give one output constraint per request; this one has {len(forms)}: "
                         f"{', '.join(name for name, _ in forms)}")
    return forms[0][1].validate() if forms else None


def _from_response_format(response_format: Any) -> StructuredOutputsParams | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if response_format.type == "json_schema":
        spec = response_format.json_schema or {}
        schema = spec.get("schema", spec.get("json_schema"))
        if not isinstance(schema, dict):
            raise ValueError('response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}')
        return StructuredOutputsParams(json=schema)
    raise ValueError(f"response_format type {response_format.type!r} is not supported "
                     f"(text, json_object, json_schema)")


def _from_legacy_fields(request: Any) -> StructuredOutputsParams | None:
    given = {name: getattr(request, name) for name in (*LEGACY_CONSTRAINTS, *LEGACY_OPTIONS)
             if getattr(request, name) is not None}
    if not given:
        return None
    for name in given.keys() - _warned:
        _warned.add(name)
        logger.warning("the request field %s is deprecated: use structured_outputs or response_format", name)
    constraints = {LEGACY_CONSTRAINTS[name]: value for name, value in given.items() if name in LEGACY_CONSTRAINTS}
    if not constraints:
        raise ValueError(f"{', '.join(given)} given without a constraint (guided_json, guided_regex, guided_choice "
                         f"or guided_grammar)")
    return StructuredOutputsParams(**constraints, whitespace_pattern=given.get("guided_whitespace_pattern"),
                                   backend=given.get("guided_decoding_backend"))


def _from_tool_choice(request: Any) -> StructuredOutputsParams | None:
    """tool_choice "required" or a named function (chat only): the output must be hermes tool calls
    (`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, what the Qwen templates ask
    for) whose arguments follow the function's parameters schema; app.tool_parsers.hermes reads them."""
    choice = getattr(request, "tool_choice", None)
    if choice is None or choice in ("none", "auto"):
        return None
    tools = request.tools or []
    if not tools:
        raise ValueError(f"tool_choice {choice if isinstance(choice, str) else 'with a named function'} requires tools")
    if isinstance(choice, str):   # "required": one or more calls of any tool
        chosen, repeat = tools, "+" if request.parallel_tool_calls else ""
    else:
        chosen, repeat = [tool for tool in tools if tool.function.name == choice.function.name], ""
        if not chosen:
            raise ValueError(f"tool_choice names the function {choice.function.name!r}, which is not in tools")
    calls = [{"type": "object", "properties": {"name": {"const": tool.function.name},
                                               "arguments": tool.function.parameters or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for tool in chosen]
    schema: dict[str, object] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    # json.dumps' separators, as the Qwen templates show the calls; no free whitespace to wander in.
    schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    # A Lark grammar (llguidance) with the JSON schema inline. The tags are the tokenizer's added
    # tokens, named as tokens: llguidance masks the quoted text "<tool_call>" to that token but then
    # refuses it when consumed (it treats added tokens as special).
    grammar = (f'start: tool_call{repeat}\ntool_call: <tool_call> "\\n" call "\\n" </tool_call> "\\n"?\n'
               f"call: %json {json.dumps(schema)}")
    return StructuredOutputsParams(grammar=grammar)
