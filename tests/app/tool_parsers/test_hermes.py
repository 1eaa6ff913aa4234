"""Hermes tool-call parsing on hand-written model texts: full-text and streaming (fed in every
chunk size) agree, no partial tag leaks into content, bad JSON stays content."""

import json

import pytest

from app.tool_parsers.hermes import HermesToolParser, parse

TWO_CALLS = ('I will look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris", "fmt": "24h"}}\n</tool_call>')


def calls_of(calls):
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def stream(text: str, chunk: int, check_leaks: bool = True):
    parser, content, calls = HermesToolParser(), [], []
    for start in range(0, len(text), chunk):
        piece, new_calls = parser.feed(text[start:start + chunk])
        assert not check_leaks or ("<" not in piece and ">" not in piece)
        content.append(piece)
        calls += new_calls
    piece, new_calls = parser.finish()
    return "".join(content) + piece, calls + new_calls


def test_two_calls_with_leading_content():
    content, calls = parse(TWO_CALLS)
    assert content == "I will look both up.\n"
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris", "fmt": "24h"})]
    assert all(c.id.startswith("chatcmpl-tool-") and c.type == "function" for c in calls)
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 11, 1000])
def test_streaming_agrees_with_full_text(chunk):
    content, calls = stream(TWO_CALLS, chunk)
    full_content, full_calls = parse(TWO_CALLS)
    assert content == full_content and calls_of(calls) == calls_of(full_calls)


def test_plain_text_and_lookalike_tags_pass_through():
    text = "a < b and <tool_callx> is not a tag; x <tool"
    assert parse(text) == (text, [])
    assert stream(text, 1, check_leaks=False) == (text, [])


def test_bad_json_stays_content_and_unterminated_call_is_parsed():
    bad = "<tool_call>{not json}</tool_call>"
    assert parse(bad) == (bad, [])
    content, calls = parse('<tool_call>{"name": "f", "arguments": {"x": 1}}')
    assert content is None and calls_of(calls) == [("f", {"x": 1})]
    content, calls = parse("<tool_call>{\"name\": \"f\"")
    assert content == "<tool_call>{\"name\": \"f\"" and calls == []


def test_string_arguments_and_no_content():
    content, calls = parse('<tool_call>{"name": "f", "arguments": "{\\"a\\": 2}"}</tool_call>')
    assert content is None and calls_of(calls) == [("f", {"a": 2})]
