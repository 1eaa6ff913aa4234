"""Runs samples/models/build_tiny.py (through the tiny_model_dir fixture) and checks the checkpoints
against transformers, the oracle every parity test relies on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

BUILDER_PATH = Path(__file__).resolve().parents[2] / "samples" / "models" / "build_tiny.py"
VL_NAMES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SPECIAL_TOKEN_FIELDS = {
    "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
}


def load_builder():
    spec = importlib.util.spec_from_file_location("build_tiny_under_test", BUILDER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_layout_and_special_ids_match_tokenizer(tiny_model_dir, name):
    model_dir = tiny_model_dir(name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    text_config = config.get_text_config()
    assert text_config.vocab_size >= len(tokenizer)
    assert text_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert text_config.bos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert generation["pad_token_id"] == tokenizer.pad_token_id
    assert (model_dir / "tokenizer.json").exists() and (model_dir / "chat_template.jinja").exists()
    if name == "qwen2":
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == [
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert not (model_dir / "model.safetensors").exists()
        return
    for field, token in SPECIAL_TOKEN_FIELDS.items():
        assert getattr(config, field) == tokenizer.convert_tokens_to_ids(token), field
    assert (model_dir / "preprocessor_config.json").exists()
    assert (model_dir / "video_preprocessor_config.json").exists()


def test_structure_covers_both_head_kinds_and_unpadded_vocab(tiny_model_dir):
    configs = {name: AutoConfig.from_pretrained(tiny_model_dir(name)) for name in ("qwen2", "qwen2_vl", "qwen2_5_vl")}
    assert configs["qwen2"].tie_word_embeddings and configs["qwen2_5_vl"].tie_word_embeddings
    assert not configs["qwen2_vl"].tie_word_embeddings
    assert any(c.get_text_config().vocab_size % 64 for c in configs.values())
    for name in ("qwen2_vl", "qwen2_5_vl"):
        text = configs[name].get_text_config()
        head_dim = text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
        assert text.num_attention_heads > text.num_key_value_heads  # GQA
    vision = configs["qwen2_5_vl"].vision_config
    assert 0 < len(vision.fullatt_block_indexes) < vision.depth and vision.window_size == 112


def test_build_is_byte_deterministic(tiny_model_dir, tmp_path):
    rebuilt = load_builder().build("qwen2_vl", tmp_path / "qwen2_vl")
    cached = tiny_model_dir("qwen2_vl")
    for path in sorted(rebuilt.iterdir()):
        assert path.read_bytes() == (cached / path.name).read_bytes(), path.name


@pytest.mark.parametrize("name", ["qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_hf_loads_every_weight_and_generates(tiny_model_dir, name):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model_class = AutoModelForCausalLM if name == "qwen2" else AutoModelForImageTextToText
    model, info = model_class.from_pretrained(tiny_model_dir(name), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(name))
    prompt = tokenizer("The quick brown fox", return_tensors="pt")
    output = model.eval().generate(**prompt, max_new_tokens=16, do_sample=False)
    new_tokens = output[0, prompt["input_ids"].shape[1]:].tolist()
    assert len(new_tokens) == 16 and len(set(new_tokens)) >= 4  # not one token repeated forever
    assert max(new_tokens) < len(tokenizer)


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！请描述这张图片。",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": [1, 2]}}\n</tool_call>',
    "tabs\tand  spaces\n\nnewlines 🙂 emoji",
])
def test_tokenizer_round_trips(tiny_model_dir, text):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("qwen2"))
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(token_ids) == text
    if text.startswith("<tool_call>"):  # an added token: one id, and not skipped as special
        assert token_ids[0] == tokenizer.convert_tokens_to_ids("<tool_call>")
        assert tokenizer.decode(token_ids, skip_special_tokens=True) == text


def test_special_tokens_are_single_ids_and_skippable(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>"
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    names = ["<|im_start|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|im_end|>"]
    assert set(tokenizer.convert_tokens_to_ids(names)) <= set(token_ids)
    assert tokenizer.decode(token_ids, skip_special_tokens=True) == "user\nhi"


def test_chat_templates_render_media_and_tools(tiny_model_dir):
    vl_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("qwen2_vl"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Hi"}]}]
    rendered = vl_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>"
                        "Hi<|im_end|>\n<|im_start|>assistant\n")
    text_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("qwen2"))
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    rendered = text_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Weather?"}], tools=[tool], tokenize=False, add_generation_prompt=True)
    assert "# Tools" in rendered and '"name": "get_weather"' in rendered
    assert rendered.endswith("Weather?<|im_end|>\n<|im_start|>assistant\n")


def test_variants_change_what_they_say_and_unknown_ones_are_refused(tiny_model_dir, tmp_path):
    default = AutoConfig.from_pretrained(tiny_model_dir("qwen2_5_vl"))
    alt = AutoConfig.from_pretrained(tiny_model_dir("qwen2_5_vl", shape="alt"))
    text, alt_text = default.get_text_config(), alt.get_text_config()
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert (alt_text.num_attention_heads, alt_text.num_key_value_heads) == (6, 1)
    assert alt.vision_config.fullatt_block_indexes != default.vision_config.fullatt_block_indexes
    assert alt.tie_word_embeddings != default.tie_word_embeddings
    weights = {scale: load_file(tiny_model_dir("qwen2_5_vl", scale=scale) / "model.safetensors")
               ["model.layers.0.mlp.down_proj.weight"] for scale in ("default", "bf16")}
    ratio = weights["bf16"].std() / weights["default"].std()
    assert abs(ratio - 0.7 / 1.5) < 0.02   # the bf16 scale's matrix gain against the default's
    builder = load_builder()
    for kwargs, word in [({"scale": "huge"}, "scale"), ({"shape": "wide"}, "shape")]:
        with pytest.raises(ValueError, match=word):
            builder.build("qwen2", tmp_path / "x", **kwargs)


def test_qwen3_vl_shapes_cover_deepstack_and_tying(tiny_model_dir):
    default = AutoConfig.from_pretrained(tiny_model_dir("qwen3_vl"))
    alt = AutoConfig.from_pretrained(tiny_model_dir("qwen3_vl", shape="alt"))
    for config in (default, alt):
        text, vision = config.get_text_config(), config.vision_config
        assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
        assert 0 < len(vision.deepstack_visual_indexes) <= text.num_hidden_layers
        assert max(vision.deepstack_visual_indexes) < vision.depth and vision.patch_size == 16
        assert text.num_attention_heads > text.num_key_value_heads
    assert default.tie_word_embeddings != alt.tie_word_embeddings
    assert default.vision_config.deepstack_visual_indexes != alt.vision_config.deepstack_visual_indexes
    # PP=2 of the default LM (3 layers) puts layers 0-1 on the first stage: both DeepStack layers
    assert len(default.vision_config.deepstack_visual_indexes) == 2 and default.text_config.num_hidden_layers == 3
