"""Bundled chat templates render exactly like the checkpoints' own templates (the tiny checkpoints
carry the Qwen2-VL and Qwen2.5 originals), and the InternVL2.5 one like its hand-written format."""

import pytest
from transformers import AutoTokenizer

from app.chat_templates import TEMPLATES_DIR, default_chat_template, load_bundled, resolve_chat_template

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
    {"role": "tool", "content": "18C"}, {"role": "tool", "content": "24C"},
]


def render(tokenizer, template, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True, **kwargs)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_qwen2_5_tools_matches_the_checkpoint_template(tiny_model_dir, messages, tools):
    path = tiny_model_dir("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = (path / "chat_template.jinja").read_text()
    assert render(tokenizer, load_bundled("qwen2_5_tools"), messages, tools=tools) == render(
        tokenizer, original, messages, tools=tools)


def test_qwen2_5_tools_tool_turns_match(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = (path / "chat_template.jinja").read_text()
    ours = render(tokenizer, load_bundled("qwen2_5_tools"), TOOL_CONVERSATION, tools=TOOLS)
    assert ours == render(tokenizer, original, TOOL_CONVERSATION, tools=TOOLS)
    assert ours.count("<tool_call>") == 2 + 2 and "<tool_response>\n24C\n</tool_response>" in ours


def test_qwen2_vl_matches_the_checkpoint_template(tiny_model_dir):
    path = tiny_model_dir("qwen2_5_vl")
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = (path / "chat_template.jinja").read_text()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                             {"type": "video"}, {"type": "image"}]},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    for extra in ({}, {"add_vision_id": True}):
        assert render(tokenizer, load_bundled("qwen2_vl"), messages, **extra) == render(
            tokenizer, original, messages, **extra)
    # OpenAI part types (which the original does not know as video) get the same placeholders.
    openai_parts = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}},
                                                 {"type": "video_url", "video_url": {"url": "v"}}]}]
    assert "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>" in render(
        tokenizer, load_bundled("qwen2_vl"), openai_parts)


def test_internvl2_5_format(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("qwen2"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}]
    expected = ("<|im_start|>system\n你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
                "<|im_end|>\n<|im_start|>user\n<image>\n<image>\nCompare.<|im_end|>\n<|im_start|>assistant\n")
    assert render(tokenizer, load_bundled("internvl2_5"), messages) == expected
    system = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    assert render(tokenizer, load_bundled("internvl2_5"), system) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")


def test_resolution_of_names_files_inline_and_defaults(tmp_path):
    assert resolve_chat_template("qwen2_vl") == resolve_chat_template("qwen2_vl.jinja") == load_bundled("qwen2_vl")
    file = tmp_path / "t.jinja"
    file.write_text("{{ messages[0]['content'] }}")
    assert resolve_chat_template(str(file)) == "{{ messages[0]['content'] }}"
    assert resolve_chat_template("{% for m in messages %}{% endfor %}").startswith("{%")
    with pytest.raises(ValueError, match="--chat-template"):
        resolve_chat_template("no_such_template")
    assert default_chat_template("InternVLChatModel") == load_bundled("internvl2_5")
    assert default_chat_template("Qwen2_5_VLForConditionalGeneration") == load_bundled("qwen2_vl")
    assert default_chat_template("LlamaForCausalLM") is None
    assert TEMPLATES_DIR.name == "chat_templates" and (TEMPLATES_DIR.parent / "app").is_dir()
