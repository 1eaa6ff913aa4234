"""Issue 17 acceptance (server): structured outputs through a real uvicorn server and the official
`openai` client, tiny Qwen2 on the CPU. Oracles: pydantic / jsonschema / json.loads / re.fullmatch
on the output, and the unconstrained output (a guided_* field that were ignored would give it)."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from app.server import create_app
from tests.app.conftest import UvicornThread, server_config

MESSAGES = [{"role": "user", "content": "Give me the answer."}]
ENGINE_KWARGS = dict(max_model_len=512, device="cpu", num_gpu_blocks_override=128, max_num_seqs=16,
                     structured_outputs_config={"disable_any_whitespace": True})
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
          "required": ["ok", "size"], "additionalProperties": False}


class Verdict(BaseModel):
    ok: bool
    size: Literal["S", "M", "L"]


@pytest.fixture(scope="module")
def client(tiny_model_dir) -> openai.OpenAI:
    model_path = str(tiny_model_dir("qwen2"))
    config = server_config(model=model_path, served_model_names=("tiny",))
    with UvicornThread(create_app({"model": model_path, **ENGINE_KWARGS}, config)) as running:
        yield openai.OpenAI(base_url=running.base_url + "/v1", api_key="none", max_retries=0)


def matches_schema(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def complete(client, max_tokens=48, **extra):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=max_tokens,
                                              extra_body=extra or None)
    return response.choices[0]


def test_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(model="tiny", messages=MESSAGES, response_format=Verdict,
                                               temperature=0, max_tokens=48)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Verdict)
    assert Verdict.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_schema_and_json_object_round_trip(client):
    choice = client.chat.completions.create(
        model="tiny", messages=MESSAGES, temperature=0, max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}},
    ).choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    choice = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=200,
                                            response_format={"type": "json_object"}).choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.message.content.startswith("{")


def test_structured_outputs_on_completions(client):
    response = client.completions.create(model="tiny", prompt="Pick:", temperature=0, max_tokens=16,
                                         extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert response.choices[0].text in ("left", "right")


@pytest.mark.parametrize("field, value, check", [
    ("guided_choice", ["alpha", "beta gamma"], lambda text: text in ("alpha", "beta gamma")),
    ("guided_regex", r"[0-9]{3}-[a-c]{2}", lambda text: re.fullmatch(r"[0-9]{3}-[a-c]{2}", text)),
    ("guided_json", SCHEMA, lambda text: matches_schema(text, SCHEMA)),
    ("guided_grammar", 'root ::= "x" [0-9] [0-9]', lambda text: re.fullmatch(r"x[0-9][0-9]", text)),
])
def test_each_legacy_guided_field_constrains(client, field, value, check):
    unconstrained = complete(client).message.content
    assert not check(unconstrained), "the oracle must tell constrained from unconstrained output"
    choice = complete(client, **{field: value})
    assert choice.finish_reason == "stop" and check(choice.message.content), choice.message.content


@pytest.mark.parametrize("extra, needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5,
                                                                                         "maximum": 1}}}},
     "structured outputs"),
    ({"structured_outputs": {"json": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
    ({"structured_outputs": {"regex": "a(b"}}, "unclosed group"),
    ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "regex, choice"),
    ({"guided_json": SCHEMA, "response_format": {"type": "json_object"}}, "one output constraint"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "regex, choice"),
    ({"guided_decoding_backend": "xgrammar"}, "without a constraint"),
    ({"guided_regex": "a+", "guided_decoding_backend": "outlines"}, "backend"),
])
def test_bad_constraints_are_400_naming_the_problem(client, extra, needle):
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, **extra)
    assert caught.value.status_code == 400
    assert needle in caught.value.body["message"], caught.value.body
    assert complete(client, guided_choice=["still", "serving"]).message.content in ("still", "serving")


def test_streamed_output_is_constrained_too(client):
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=48, stream=True,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "v", "schema": SCHEMA}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert matches_schema(text, SCHEMA)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["unit", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"], "additionalProperties": False}}}


@pytest.mark.parametrize("tool_choice, names", [
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ("required", {"get_weather", "get_time"}),
])
def test_tool_choice_required_and_named_give_valid_tool_calls(client, tool_choice, names):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=96,
                                              tools=[WEATHER, TIME], tool_choice=tool_choice, parallel_tool_calls=False)
    message = response.choices[0].message
    assert response.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1, message
    call = message.tool_calls[0].function
    assert call.name in names
    parameters = {"get_weather": WEATHER, "get_time": TIME}[call.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.arguments), parameters)
