"""--structured-outputs-config and the request record: parsing, validation messages naming the flag
or field, the CLI flag reaching EngineConfig, and the offline names (GuidedDecodingParams)."""

from __future__ import annotations

import pytest

from app.cli import parse_serve_args
from engine import GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from engine.config_loader import create_engine_config
from engine.structured_output import StructuredOutputsConfig
from engine.structured_output.resolve import resolve_structured_outputs


def test_cli_flag_reaches_the_engine_config(tiny_model_dir):
    engine_kwargs, _ = parse_serve_args(["m", "--structured-outputs-config",
                                         '{"backend": "xgrammar", "disable_any_whitespace": true}'])
    assert engine_kwargs["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}
    config = create_engine_config(**{**engine_kwargs, "model": str(tiny_model_dir("qwen2")), "device": "cpu"})
    assert config.structured_outputs_config == StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
    assert create_engine_config(model=str(tiny_model_dir("qwen2")), device="cpu").structured_outputs_config.backend == "auto"


@pytest.mark.parametrize("value, message", [
    ('{"backend": "outlines"}', "backend must be one of auto, guidance, xgrammar"),
    ('{"backnd": "auto"}', "unknown key(s) backnd"),
    ("[1]", "expected a JSON object"),
    ('{"compile_timeout_s": 0}', "compile_timeout_s must be positive"),
])
def test_bad_config_names_the_flag(value, message):
    with pytest.raises(ValueError, match="--structured-outputs-config") as caught:
        StructuredOutputsConfig.parse(value)
    assert message in str(caught.value)


def test_params_need_exactly_one_constraint_and_keep_the_old_name():
    assert GuidedDecodingParams is StructuredOutputsParams
    with pytest.raises(ValueError, match=r"2 were \(json, regex\)"):
        SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object"}, regex="a")).validate()
    with pytest.raises(ValueError, match="none was given"):
        StructuredOutputsParams().validate()
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        StructuredOutputsParams(choice=[]).validate()


def test_resolve_folds_in_the_engine_options_and_picks_a_backend():
    config = StructuredOutputsConfig(disable_any_whitespace=True, disable_additional_properties=True)
    resolved = resolve_structured_outputs(StructuredOutputsParams(json={"type": "object", "properties": {}}), config)
    assert resolved.backend == "guidance" and resolved.disable_any_whitespace
    assert '"additionalProperties":false' in resolved.spec().text and not resolved.spec().any_whitespace
    # xgrammar's EBNF has lookahead, which llguidance's converter refuses: auto falls back to xgrammar.
    ebnf = 'root ::= a "y"\na ::= "x" (= "y")'
    assert resolve_structured_outputs(StructuredOutputsParams(grammar=ebnf), config).backend == "xgrammar"
    assert resolve_structured_outputs(StructuredOutputsParams(grammar='root ::= "x"'), config).backend == "guidance"
    with pytest.raises(ValueError, match="guidance: Expected"):
        resolve_structured_outputs(StructuredOutputsParams(grammar=ebnf, backend="guidance"), config)
    # xgrammar would match \Z as a literal Z: a regex llguidance refuses is not handed to it.
    with pytest.raises(ValueError, match="unrecognized escape sequence"):
        resolve_structured_outputs(StructuredOutputsParams(regex=r"a\Z"), config)
    with pytest.raises(ValueError, match="whitespace_pattern is not supported by the xgrammar backend"):
        resolve_structured_outputs(StructuredOutputsParams(json={"type": "object"}, whitespace_pattern=" ?",
                                                           backend="xgrammar"), StructuredOutputsConfig())


@pytest.mark.parametrize("backend,checked", [("auto", ["guidance"]), ("guidance", ["guidance"]),
                                             ("xgrammar", ["guidance", "xgrammar"])])
def test_a_new_json_schema_is_checked_once_per_backend(monkeypatch, backend, checked):
    """A new schema's check (~2 ms for 10 fields, on the request path before it is queued) runs once
    per backend: llguidance's verdict on a JSON schema is not asked twice."""
    import engine.structured_output.resolve as resolve

    calls = []
    monkeypatch.setattr(resolve, "check_spec", lambda name, spec: calls.append(name) or None)
    schema = {"type": "object", "properties": {"checked_once": {"type": "integer"}, "backend": {"const": backend}}}
    resolved = resolve_structured_outputs(StructuredOutputsParams(json=schema, backend=backend), StructuredOutputsConfig())
    assert resolved.backend == ("guidance" if backend == "auto" else backend) and calls == checked
