"""StructuredOutputsConfig: `--structured-outputs-config` (vLLM's flag and keys), frozen and
validated once. Caller: engine.config_loader (CLI and LLM(structured_outputs_config=...))."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from engine.structured_output.params import BACKENDS


@dataclass(frozen=True)
class StructuredOutputsConfig:
    # auto: llguidance, falling back per request to xgrammar for a spec llguidance refuses.
    backend: str = "auto"
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    # A request whose grammar is not compiled after this long fails (HTTP 400).
    compile_timeout_s: float = 30.0
    # Compiled grammars kept (LRU), keyed by backend and spec.
    max_cached_grammars: int = 512

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"--structured-outputs-config: {message}")

        require(self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        require(self.compile_timeout_s > 0, f"compile_timeout_s must be positive, got {self.compile_timeout_s}")
        require(self.max_cached_grammars >= 1,
                f"max_cached_grammars must be at least 1, got {self.max_cached_grammars}")

    @staticmethod
    def parse(value: "str | dict[str, Any] | StructuredOutputsConfig | None") -> "StructuredOutputsConfig":
        """A JSON object (text or dict) with the keys above -> config; ValueError naming the flag."""
        if value is None or isinstance(value, StructuredOutputsConfig):
            return value or StructuredOutputsConfig()
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"--structured-outputs-config: invalid JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise ValueError("--structured-outputs-config: expected a JSON object")
        known = {f.name for f in fields(StructuredOutputsConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"--structured-outputs-config: unknown key(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        return StructuredOutputsConfig(**value)
