"""Check a request's structured-output spec and pick its backend, before it is queued.

Caller: engine.frontend.Frontend.make_request (API process, or LLM). A spec no backend accepts is
a ValueError with the library's message (HTTP 400); the engine core then only compiles specs that
were checked here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import msgspec

from engine.structured_output.backends import check_spec
from engine.structured_output.config import StructuredOutputsConfig
from engine.structured_output.params import GrammarSpec, StructuredOutputsParams

# (requested backend, spec) -> the backend that takes it, or the ValueError message: a schema sent
# again is not re-checked (the check of a large schema costs milliseconds).
_MAX_CHECKED = 1024
_checked: OrderedDict[tuple[str, GrammarSpec], tuple[str | None, str | None]] = OrderedDict()
_checked_lock = threading.Lock()


def resolve_structured_outputs(params: StructuredOutputsParams,
                               config: StructuredOutputsConfig) -> StructuredOutputsParams:
    """-> params with the engine-wide whitespace/property options folded in and `backend` set to
    the one that compiles it. `auto` tries llguidance, then xgrammar for a spec llguidance refuses."""
    params = msgspec.structs.replace(
        params.validate(),
        disable_any_whitespace=params.disable_any_whitespace or config.disable_any_whitespace,
        disable_additional_properties=params.disable_additional_properties or config.disable_additional_properties)
    spec = params.spec()
    requested = params.backend if params.backend not in (None, "auto") else config.backend
    key = (requested, spec)
    with _checked_lock:
        found = _checked.get(key)
    if found is None:
        found = _choose_backend(requested, spec)
        with _checked_lock:
            _checked[key] = found
            if len(_checked) > _MAX_CHECKED:
                _checked.popitem(last=False)
    backend, error = found
    if error is not None:
        raise ValueError(error)
    return msgspec.structs.replace(params, backend=backend)


def _choose_backend(requested: str, spec: GrammarSpec) -> tuple[str | None, str | None]:
    passed = set()   # backends whose check passed: each is run once (~2 ms for a 10-field schema)
    if spec.kind == "json":
        # xgrammar compiles a schema with keywords it does not implement (not, if/then, uniqueItems,
        # unknown formats) by ignoring them: the output would "fail open". llguidance names them, so
        # its verdict on a JSON schema holds whichever backend compiles it.
        error = check_spec("guidance", spec)
        if error is not None:
            return None, _invalid(spec, [f"guidance: {error}"])
        passed.add("guidance")
    # auto falls back to xgrammar only where the two differ in dialect, not in meaning: EBNF
    # grammars (lookahead, escapes) and structural tags. Its regexes match an unknown escape such as
    # \Z literally, so a regex llguidance refuses is refused.
    fallback = ("xgrammar",) if spec.kind in ("grammar", "structural_tag") else ()
    candidates = ("guidance", *fallback) if requested == "auto" else (requested,)
    errors = []
    for backend in candidates:
        error = None if backend in passed else check_spec(backend, spec)
        if error is None:
            return backend, None
        errors.append(f"{backend}: {error}")
    return None, _invalid(spec, errors)


def _invalid(spec: GrammarSpec, errors: list[str]) -> str:
    return f"structured outputs: the {spec.kind} constraint is invalid or unsupported ({'; '.join(errors)})"
