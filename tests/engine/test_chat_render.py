"""engine.chat_render against transformers' apply_chat_template on the HF-native message shape
(the oracle) and hand-written expected prompts."""

import json

import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from engine.chat_render import MediaRef, render_chat, wants_content_parts

# Qwen2-VL-7B-Instruct's own chat template (chat_template.json), verbatim.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or "
    "'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")

# A string-content template with tools, in the style of Qwen2.5's.
TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{% if message.content %}{{ message.content }}{% endif %}"
    "{% for call in message.tool_calls or [] %}<tool_call>{{ call.function.name }} {{ call.function.arguments | tojson }}"
    "</tool_call>{% endfor %}{% if not (loop.last and continue_final_message) %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking %}<think>{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tokenizer.chat_template = QWEN2_VL_TEMPLATE
    return tokenizer


def test_openai_parts_render_like_hf_image_and_video_parts(tokenizer):
    pil = Image.new("RGB", (8, 8))
    messages = [
        {"role": "user", "content": [
            {"type": "text", "text": "Compare "},
            {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}, "uuid": "u1"},
            {"type": "video_url", "video_url": {"url": "file:///v.mp4"}},
            {"type": "image_pil", "image_pil": pil},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "And?"}]
    hf_messages = [
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "video"},
                                     {"type": "image"}, {"type": "image"}]},
        messages[1], messages[2]]
    rendered = render_chat(tokenizer, messages)
    assert rendered.prompt == tokenizer.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    assert rendered.prompt.count("<|image_pad|>") == 3 and rendered.prompt.endswith("<|im_start|>assistant\n")
    assert rendered.media == [
        MediaRef("image", url="https://x/a.png", uuid="u1", detail="low"),
        MediaRef("video", url="file:///v.mp4"),
        MediaRef("image", data=pil),
        MediaRef("image", url="data:image/png;base64,AAAA")]


def test_string_template_joins_text_parts_and_renders_tools(tokenizer, tmp_path):
    template_file = tmp_path / "tools.jinja"
    template_file.write_text(TOOLS_TEMPLATE)
    assert not wants_content_parts(TOOLS_TEMPLATE) and wants_content_parts(QWEN2_VL_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    rendered = render_chat(tokenizer, messages, chat_template=str(template_file), tools=tools,
                           chat_template_kwargs={"enable_thinking": True})
    expected = ("<tools>" + json.dumps(tools[0]) + "</tools>\n"
                "<|im_start|>user\nWeather\nin Paris?<|im_end|>\n"
                "<|im_start|>assistant\n<tool_call>get_weather {\"city\": \"Paris\"}</tool_call><|im_end|>\n"
                "<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\n<think>")
    assert rendered.prompt == expected and rendered.media == []


def test_continue_final_message_leaves_the_assistant_turn_open(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]
    rendered = render_chat(tokenizer, messages, chat_template=TOOLS_TEMPLATE, continue_final_message=True)
    assert rendered.prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello, I am"


@pytest.mark.parametrize("messages, kwargs, fragment", [
    ([{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "x"}}]}], {}, "audio_url"),
    ([{"content": "no role"}], {}, "role"),
    ([], {}, "at least one message"),
    ([{"role": "user", "content": "x"}], {"chat_template": "not a template"}, "chat_template"),
    ([{"role": "user", "content": "x"}], {"chat_template_kwargs": {"tools": []}}, "tools"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}], {}, "JSON"),
])
def test_bad_messages_raise_value_error(tokenizer, messages, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        render_chat(tokenizer, messages, **kwargs)


def test_missing_template_is_a_value_error():
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    with pytest.raises(ValueError, match="chat template"):
        render_chat(tokenizer, [{"role": "user", "content": "x"}])


def test_long_single_line_inline_template_is_not_taken_for_a_path():
    from engine.chat_render import resolve_template_text
    template = "{{ 'x' }}" + "{# padding #}" * 400  # one line, far longer than a file name may be
    assert resolve_template_text(template) == template
