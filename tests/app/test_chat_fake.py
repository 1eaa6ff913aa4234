"""/v1/chat/completions through the whole app (routing, limits, media, real Frontend) with the
FakeEngineClient. Oracles: the scripted reply (what the engine produced), the real Frontend called
directly on the same messages, and transformers' processor for the image token count."""

import base64
import io
import json

import numpy as np
from PIL import Image
from transformers import AutoProcessor

from app.chat_templates import load_bundled
from engine.sampling_params import SamplingParams
from engine.frontend import MediaInput

TOOL_REPLY = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
              '</tool_call>')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def chat(messages, **extra) -> dict:
    return {"model": "tiny-vl", "messages": messages, **extra}


def sse_events(response) -> list:
    lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
    return [line[len("data: "):] for line in lines]


def test_image_chat_matches_frontend_and_hf_token_count(make_client, vl_frontend, tiny_model_dir):
    client, fake = make_client()
    data = png_bytes(200, 150)
    messages = [{"role": "user", "content": [image_part(data), {"type": "text", "text": "What is this?"}]}]
    response = client.post("/v1/chat/completions", json=chat(messages, temperature=0))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "Hello there, friend."
    assert body["choices"][0]["finish_reason"] == "stop" and body["object"] == "chat.completion"
    # Oracle 1: the Frontend on the same messages with the image decoded by PIL directly.
    rendered = vl_frontend.render_chat(messages)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    expected = vl_frontend.make_request("x", rendered.prompt, [MediaInput("image", image)], SamplingParams(),
                                        add_special_tokens=False)
    [sent] = fake.requests
    assert sent.prompt_token_ids == expected.prompt_token_ids
    # Oracle 2: transformers' processor says how many image tokens this image takes.
    processor = AutoProcessor.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    num_image_tokens = int(grid.prod()) // processor.image_processor.merge_size ** 2
    usage = body["usage"]
    assert usage["prompt_tokens_details"]["image_tokens"] == num_image_tokens
    assert usage["prompt_tokens"] == len(expected.prompt_token_ids)
    reply_len = len(vl_frontend.tokenizer.encode("Hello there, friend.", add_special_tokens=False))
    assert usage["completion_tokens"] == reply_len and usage["total_tokens"] == usage["prompt_tokens"] + reply_len


def test_streaming_yields_role_deltas_finish_usage_and_done(make_client):
    client, _ = make_client()
    response = client.post("/v1/chat/completions", json=chat([{"role": "user", "content": "hi"}], stream=True,
                                                               stream_options={"include_usage": True}))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello there, friend."
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 1
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)


def test_six_images_over_limit_is_400_before_any_fetch(make_client):
    client, fake = make_client()
    # Unreachable URLs: had anything been fetched, the error would be a fetch error, not the limit.
    parts = [{"type": "image_url", "image_url": {"url": f"http://127.0.0.1:9/{i}.png"}} for i in range(6)]
    response = client.post("/v1/chat/completions", json=chat([{"role": "user", "content": parts}]))
    assert response.status_code == 400
    error = response.json()["error"]
    assert "at most 5 image" in error["message"] and error["type"] == "invalid_request_error" and error["code"] == 400
    assert fake.requests == []


def test_refusals_are_400_with_openai_error_shape(make_client):
    client, _ = make_client()
    user = [{"role": "user", "content": "hi"}]
    cases = [
        (chat([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]),
         "input_audio"),
        (chat(user, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}),
         "Invalid type: foo"),
        (chat(user, response_format={"type": "json_object"}, guided_regex="a+"), "one output constraint"),
        (chat(user, chat_template="{{ 'x' }}"), "--trust-request-chat-template"),
        (chat(user, tool_choice="required"), "requires tools"),
        (chat(user, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "not in tools"),
        (chat(user, n=17), "n must be at most 16"),
        (chat(user, logprobs=True, top_logprobs=21), "top_logprobs"),
        (chat(user, temperature="hot"), "temperature"),
        (chat(user, stop=["x"] * 17), "stop"),
        (chat(user, max_tokens=0), "max_tokens"),
        (chat([]), "messages"),
        (chat(user, stream_options={"include_usage": True}), "stream_options"),
        (chat(user, max_tokens=5000), "maximum context length"),
    ]
    for payload, needle in cases:
        response = client.post("/v1/chat/completions", json=payload)
        assert response.status_code == 400, (payload, response.text)
        error = response.json()["error"]
        assert needle in error["message"] + str(error["param"]), (needle, error)
        assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
    bad_json = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "error" in bad_json.json()


def test_unknown_model_404_and_alias_accepted(make_client):
    client, _ = make_client()
    user = [{"role": "user", "content": "hi"}]
    missing = client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": user})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    alias = client.post("/v1/chat/completions", json={"model": "alias", "messages": user})
    assert alias.status_code == 200 and alias.json()["model"] == "alias"


def test_body_too_large_is_413(make_client):
    client, _ = make_client(request_max_body_size=1000)
    response = client.post("/v1/chat/completions", json=chat([{"role": "user", "content": "x" * 5000}]))
    assert response.status_code == 413 and response.json()["error"]["code"] == 413


def test_tool_calls_parsed_non_streaming_and_streaming(make_client):
    client, fake = make_client(reply=lambda request: TOOL_REPLY, chat_template=load_bundled("qwen2_5_tools"))
    user = [{"role": "user", "content": "Weather in Paris?"}]
    body = client.post("/v1/chat/completions", json=chat(user, tools=TOOLS)).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me check."
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "C"}
    assert "# Tools" in vl_prompt(fake, 0) and '"name": "get_weather"' in vl_prompt(fake, 0)
    chunks = [json.loads(e) for e in sse_events(client.post("/v1/chat/completions",
                                                            json=chat(user, tools=TOOLS, stream=True)))[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == "Let me check." and "<" not in content
    calls = [tc for d in deltas for tc in d.get("tool_calls") or []]
    assert [(tc["index"], tc["function"]["name"], json.loads(tc["function"]["arguments"])) for tc in calls] == [
        (0, "get_weather", {"city": "Paris", "unit": "C"})]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # tool_choice none: tools are not rendered and the text is returned as it is.
    plain = client.post("/v1/chat/completions", json=chat(user, tools=TOOLS, tool_choice="none")).json()
    assert plain["choices"][0]["message"]["content"] == TOOL_REPLY and "# Tools" not in vl_prompt(fake, 2)


def vl_prompt(fake, index: int) -> str:
    return fake.frontend.tokenizer.decode(fake.requests[index].prompt_token_ids)


def test_tools_need_auto_tool_choice_flag(make_client):
    client, _ = make_client(enable_auto_tool_choice=False, tool_call_parser=None)
    response = client.post("/v1/chat/completions", json=chat([{"role": "user", "content": "x"}], tools=TOOLS))
    assert response.status_code == 400 and "--enable-auto-tool-choice" in response.json()["error"]["message"]


def test_logprobs_and_length_finish(make_client, vl_frontend):
    client, _ = make_client()
    body = client.post("/v1/chat/completions", json=chat([{"role": "user", "content": "hi"}], logprobs=True,
                                                         top_logprobs=2, max_tokens=3, n=2)).json()
    ids = vl_frontend.tokenizer.encode("Hello there, friend.", add_special_tokens=False)[:3]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert choice["finish_reason"] == "length"
        assert choice["message"]["content"] == vl_frontend.tokenizer.decode(ids)
        content = choice["logprobs"]["content"]
        assert [c["token"] for c in content] == [vl_frontend.tokenizer.decode([t]) for t in ids]
        assert all(c["logprob"] == -0.5 for c in content)
        assert [[t["logprob"] for t in c["top_logprobs"]] for c in content] == [[-0.5, -1.0]] * 3
        assert content[0]["bytes"] == list(content[0]["token"].encode())
    assert body["usage"]["completion_tokens"] == 6
