"""Structured outputs (JSON schema, regex, choice, grammar, structural tag) through llguidance and
xgrammar: params.py (the request record), config.py (--structured-outputs-config), resolve.py
(frontend check), backends.py (the two libraries), manager.py (compile, matchers, bitmask)."""

from engine.structured_output.config import StructuredOutputsConfig
from engine.structured_output.params import GuidedDecodingParams, StructuredOutputsParams

__all__ = ["GuidedDecodingParams", "StructuredOutputsConfig", "StructuredOutputsParams"]
