"""The bundled qwen2_5_vl_tools template: without tools it renders as the Qwen2.5-VL checkpoint's own
template; with tools its system turn is Qwen2.5's (the qwen2 checkpoint's own template is the oracle);
through the server, tools + an image answer 200 with the tool definitions in the prompt. A template
that drops tools (the checkpoint's Qwen2-VL one) is logged once."""

import json
import logging

import pytest
from transformers import AutoTokenizer

from app.chat_templates import load_bundled
from app.routes.chat import warn_tools_dropped
from tests.app.test_chat_fake import TOOLS, chat, image_part, png_bytes

# 200x150 -> smart_resize to 196x140 -> 14x10 patches of 14 -> merged 2x2: 35 placeholder tokens.
IMAGE_TOKENS = 35
# TOOLS[0] as the server hands it to the template (vLLM's key order: type, then function).
TOOL_JSON = ('{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": '
             '{"type": "object", "properties": {"city": {"type": "string"}}}}}')
VL_MESSAGES = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "video"},
                                  {"type": "image"}]},
     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
]


def render(tokenizer, template, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True, **kwargs)


@pytest.mark.parametrize("messages", VL_MESSAGES)
@pytest.mark.parametrize("extra", [{}, {"add_vision_id": True}])
def test_without_tools_it_is_the_qwen2_5_vl_template(tiny_model_dir, messages, extra):
    path = tiny_model_dir("qwen2_5_vl")
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = (path / "chat_template.jinja").read_text()
    assert render(tokenizer, load_bundled("qwen2_5_vl_tools"), messages, **extra) == render(
        tokenizer, original, messages, **extra)


def test_with_tools_and_text_it_is_the_qwen2_5_template(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "18C"}]
    original = (path / "chat_template.jinja").read_text()
    ours = render(tokenizer, load_bundled("qwen2_5_vl_tools"), messages, tools=TOOLS)
    assert ours == render(tokenizer, original, messages, tools=TOOLS)
    assert "<tools>\n" + json.dumps(TOOLS[0]) in ours


def test_tools_and_an_image_through_the_server(make_client, vl_frontend):
    client, fake = make_client(chat_template=load_bundled("qwen2_5_vl_tools"))
    messages = [{"role": "user", "content": [image_part(png_bytes(200, 150)), {"type": "text", "text": "Weather?"}]}]
    response = client.post("/v1/chat/completions", json=chat(messages, tools=TOOLS))
    assert response.status_code == 200, response.text
    assert json.loads(TOOL_JSON) == TOOLS[0]
    expected_prompt = (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to "
        "assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML "
        f"tags:\n<tools>\n{TOOL_JSON}\n</tools>\n\nFor each function call, return a json object with "
        "function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
        "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|>{'<|image_pad|>' * IMAGE_TOKENS}<|vision_end|>Weather?<|im_end|>\n<|im_start|>assistant\n")
    expected_ids = vl_frontend.tokenizer.encode(expected_prompt, add_special_tokens=False)
    assert fake.requests[-1].prompt_token_ids == expected_ids
    assert response.json()["usage"]["prompt_tokens"] == len(expected_ids)


def test_tools_dropped_by_the_template_are_logged_once(make_client, caplog):
    warn_tools_dropped.cache_clear()  # "once" is per process; earlier tests may have sent tools already
    client, fake = make_client()  # the checkpoint's Qwen2-VL template, which ignores tools
    messages = [{"role": "user", "content": [image_part(png_bytes(64, 64)), {"type": "text", "text": "Weather?"}]}]
    with caplog.at_level(logging.WARNING, logger="vlserve.chat"):
        for _ in range(2):
            assert client.post("/v1/chat/completions", json=chat(messages, tools=TOOLS)).status_code == 200
        assert client.post("/v1/chat/completions", json=chat(messages)).status_code == 200
    assert fake.requests[0].prompt_token_ids == fake.requests[2].prompt_token_ids  # tools really dropped
    warnings = [r for r in caplog.records if "tools were dropped" in r.getMessage()]
    assert len(warnings) == 1 and "qwen2_5_vl_tools" in warnings[0].getMessage()
