"""Runs samples/models/real_shape.py and checks its configs against /work/shared/REFERENCE.md's table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

REAL_SHAPE_PATH = Path(__file__).resolve().parents[2] / "samples" / "models" / "real_shape.py"

# REFERENCE.md: LM hidden / layers / heads / KV heads / intermediate / vocab / tied
EXPECTED_LM = {
    "qwen2_5_vl_3b": (2048, 36, 16, 2, 11008, 151936, True),
    "qwen2_5_vl_7b": (3584, 28, 28, 4, 18944, 152064, False),
    "qwen2_vl_7b": (3584, 28, 28, 4, 18944, 152064, False),
    "qwen2_5_14b": (5120, 48, 40, 8, 13824, 152064, False),
}


def load_real_shape():
    spec = importlib.util.spec_from_file_location("real_shape_under_test", REAL_SHAPE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_shape_dirs(tmp_path_factory):
    module = load_real_shape()
    root = tmp_path_factory.mktemp("real_shape")
    return {name: module.write_real_shape_dir(name, root / name) for name in EXPECTED_LM}


@pytest.mark.parametrize("name", sorted(EXPECTED_LM))
def test_language_model_shape(real_shape_dirs, name):
    config = AutoConfig.from_pretrained(real_shape_dirs[name])
    text = config.get_text_config()
    actual = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
              text.intermediate_size, text.vocab_size, config.tie_word_embeddings)
    assert actual == EXPECTED_LM[name]
    assert text.rope_parameters["rope_theta"] == 1e6
    assert not list(real_shape_dirs[name].glob("*.safetensors"))  # no weights
    tokenizer = AutoTokenizer.from_pretrained(real_shape_dirs[name])
    if name != "qwen2_5_14b":
        assert text.rope_parameters["mrope_section"] == [16, 24, 24]
        assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")


@pytest.mark.parametrize("name", ["qwen2_5_vl_3b", "qwen2_5_vl_7b"])
def test_qwen2_5_vl_tower(real_shape_dirs, name):
    vision = AutoConfig.from_pretrained(real_shape_dirs[name]).vision_config
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (32, 1280, 16, 3420)
    assert (vision.window_size, list(vision.fullatt_block_indexes)) == (112, [7, 15, 23, 31])
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (14, 2, 2)
    assert vision.out_hidden_size == EXPECTED_LM[name][0] and vision.hidden_act == "silu"


def test_qwen2_vl_tower(real_shape_dirs):
    vision = AutoConfig.from_pretrained(real_shape_dirs["qwen2_vl_7b"]).vision_config
    assert (vision.depth, vision.embed_dim, vision.num_heads, vision.mlp_ratio) == (32, 1280, 16, 4)
    assert vision.hidden_act == "quick_gelu" and vision.hidden_size == 3584


# Qwen/Qwen3-VL-*-Instruct config.json: LM hidden / layers / heads / KV heads / head_dim / intermediate / tied;
# tower depth / hidden / intermediate / DeepStack taps.
EXPECTED_QWEN3_VL = {
    "qwen3_vl_2b": ((2048, 28, 16, 8, 128, 6144, True), (24, 1024, 4096, [5, 11, 17])),
    "qwen3_vl_4b": ((2560, 36, 32, 8, 128, 9728, True), (24, 1024, 4096, [5, 11, 17])),
    "qwen3_vl_8b": ((4096, 36, 32, 8, 128, 12288, False), (27, 1152, 4304, [8, 16, 24])),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_QWEN3_VL))
def test_qwen3_vl_shapes(tmp_path, name):
    config = AutoConfig.from_pretrained(load_real_shape().write_real_shape_dir(name, tmp_path / name))
    text, vision = config.get_text_config(), config.vision_config
    assert config.architectures == ["Qwen3VLForConditionalGeneration"]
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size, config.tie_word_embeddings) == EXPECTED_QWEN3_VL[name][0]
    assert (vision.depth, vision.hidden_size, vision.intermediate_size,
            list(vision.deepstack_visual_indexes)) == EXPECTED_QWEN3_VL[name][1]
    assert text.rope_parameters["mrope_section"] == [24, 20, 20] and text.rope_parameters["rope_theta"] == 5e6
    assert (vision.patch_size, vision.num_position_embeddings, vision.out_hidden_size) == (16, 2304, text.hidden_size)


def test_unknown_name_is_a_value_error():
    with pytest.raises(ValueError, match="name"):
        load_real_shape().real_shape_config("qwen3_vl_30b_a3b")
