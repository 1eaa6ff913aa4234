"""StructuredOutputsParams: the one constraint a request puts on its output (vLLM's names), and
GrammarSpec, the backend-neutral form every backend compiles.

Caller: SamplingParams carries StructuredOutputsParams (offline API and the HTTP routes build it);
engine.structured_output.backends turns its GrammarSpec into a grammar. Exactly one constraint per
request: two is a ValueError naming both, none is a ValueError too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec

# Constraint fields, in the order error messages list them.
CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
BACKENDS = ("auto", "guidance", "xgrammar")


class StructuredOutputsParams(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    json: str | dict[str, Any] | None = None   # a JSON schema (object or its text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None                 # EBNF (GBNF, `root ::= ...`) or Lark
    json_object: bool | None = None            # any JSON object
    structural_tag: str | None = None          # vLLM's {"structures": [...], "triggers": [...]} as text
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None      # JSON whitespace as a regex (guidance only)
    # Set by the frontend once it has checked the spec: the backend that compiles it ("guidance" or
    # "xgrammar"). A user may ask for one (legacy guided_decoding_backend); None: the engine's choice.
    backend: str | None = None

    def validate(self) -> "StructuredOutputsParams":
        given = self.constraint_names()
        if len(given) != 1:
            what = "none was" if not given else f"{len(given)} were ({', '.join(given)})"
            raise ValueError(f"structured_outputs: give exactly one of {', '.join(CONSTRAINTS)}; {what} given")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"structured_outputs backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        return self

    def constraint_names(self) -> list[str]:
        return [name for name in CONSTRAINTS if getattr(self, name) not in (None, False)]

    def spec(self) -> "GrammarSpec":
        """The constraint as (kind, text); a JSON schema as compact JSON text in its own key order
        (property order is output order, so it is part of the spec)."""
        kind = self.validate().constraint_names()[0]
        if kind == "json":
            text = _schema_text(self.json, self.disable_additional_properties)
        elif kind == "json_object":
            kind, text = "json", _schema_text({"type": "object"}, self.disable_additional_properties)
        elif kind == "choice":
            text = json.dumps(self.choice)
        else:
            text = getattr(self, kind)
        return GrammarSpec(kind=kind, text=text, any_whitespace=not self.disable_any_whitespace,
                           whitespace_pattern=self.whitespace_pattern)


# vLLM's older name for the same record.
GuidedDecodingParams = StructuredOutputsParams


@dataclass(frozen=True)
class GrammarSpec:
    """What a backend compiles; also the compile cache's key (with the backend name)."""

    kind: str                  # "json" | "regex" | "choice" (text: JSON list) | "grammar" | "structural_tag"
    text: str
    any_whitespace: bool = True
    whitespace_pattern: str | None = None


def _schema_text(schema: str | dict[str, Any] | None, disable_additional_properties: bool) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"structured_outputs.json is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(schema).__name__}")
    if disable_additional_properties:
        schema = _close_objects(schema)
    return json.dumps(schema, separators=(",", ":"))


def _close_objects(schema: Any) -> Any:
    """Every object schema without `additionalProperties` gets `false` (disable_additional_properties)."""
    if isinstance(schema, list):
        return [_close_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _close_objects(value) for key, value in schema.items()}
    if (closed.get("type") == "object" or "properties" in closed) and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed
