"""InternViT + pixel shuffle + mlp1 vs transformers' InternVLModel.get_image_features (float32,
eager attention), loaded from transformers' names and from the original (OpenGVLab) names."""

from __future__ import annotations

import pytest
import torch

from vision.towers.intern_vit import InternViTConfig, InternVisionTower


def _hf_config(image_size=56, patch=14, norm_type="layer_norm", qk_norm=False, bias=True,
               mean_pooling=True, feature_layer=-1, layers=3, heads=2, hidden=32):
    from transformers import InternVLConfig

    vision = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=48,
                  image_size=image_size, patch_size=patch, norm_type=norm_type, use_qk_norm=qk_norm,
                  attention_bias=bias, use_mean_pooling=mean_pooling, hidden_act="gelu")
    text = dict(model_type="qwen2", hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    return InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5,
                          vision_feature_layer=feature_layer)


def _hf_model(config, hf_vision_tower):
    from transformers import InternVLModel

    return hf_vision_tower(InternVLModel, config, seed=3)


def _ours(config) -> InternVisionTower:
    vit = InternViTConfig.from_configs(config.vision_config, config.text_config.hidden_size,
                                       downsample_ratio=config.downsample_ratio,
                                       select_layer=config.vision_feature_layer)
    return InternVisionTower(vit).eval()


def _hf_state(model) -> dict[str, torch.Tensor]:
    """transformers' vision + projector weights, names relative to `model.` as in the checkpoint."""
    return {name: tensor for name, tensor in model.state_dict().items()
            if name.startswith(("vision_tower.", "multi_modal_projector."))}


def _original_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The conversion OpenGVLab -> transformers, run backwards by hand: fuse q/k/v into qkv."""
    out = {}
    for name, tensor in state.items():
        new = (name.replace("vision_tower.", "vision_model.").replace(".cls_token", ".class_embedding")
               .replace(".position_embeddings", ".position_embedding")
               .replace(".patch_embeddings.projection.", ".patch_embedding.")
               .replace("encoder.layer.", "encoder.layers.").replace(".attention.projection_layer.", ".attn.proj.")
               .replace(".attention.q_norm.", ".attn.q_norm.").replace(".attention.k_norm.", ".attn.k_norm.")
               .replace(".layernorm_before.", ".norm1.").replace(".layernorm_after.", ".norm2.")
               .replace(".lambda_1", ".ls1").replace(".lambda_2", ".ls2")
               .replace("multi_modal_projector.layer_norm.", "mlp1.0.")
               .replace("multi_modal_projector.linear_1.", "mlp1.1.")
               .replace("multi_modal_projector.linear_2.", "mlp1.3."))
        if ".attention.k_proj." in name or ".attention.v_proj." in name:
            continue
        if ".attention.q_proj." in name:
            parts = [state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            new = new.replace(".attention.q_proj.", ".attn.qkv.")
            tensor = torch.cat(parts, dim=0)
        out[new] = tensor
    return out


def _pixels(num_tiles: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_tiles, 3, size, size, generator=torch.Generator().manual_seed(seed))


CASES = {
    "layernorm": dict(),
    "rmsnorm_qknorm_nobias_finalnorm": dict(norm_type="rms_norm", qk_norm=True, bias=False, mean_pooling=False),
    "select_layer_-2_finalnorm": dict(mean_pooling=False, feature_layer=-2),
    "image_84_patch_14": dict(image_size=84, heads=4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tower_matches_transformers_both_layouts(case, hf_vision_tower):
    config = _hf_config(**CASES[case])
    hf = _hf_model(config, hf_vision_tower)
    size = config.vision_config.image_size[0]
    pixels = _pixels(3, size)
    with torch.no_grad():
        expected = hf.get_image_features(pixel_values=pixels).pooler_output  # [3, tokens, llm_hidden]
    state = _hf_state(hf)
    grid_thw = torch.tensor([[2, 1, 1], [1, 1, 1]])
    for hf_native, weights in ((True, state), (False, _original_names(state))):
        ours = _ours(config)
        loaded = ours.load_weights(weights.items(), hf_native=hf_native)
        assert loaded == ours.expected_weight_names()
        with torch.no_grad():
            got = ours(pixels, grid_thw)
        assert got.shape == (expected.shape[0] * expected.shape[1], expected.shape[2])
        torch.testing.assert_close(got, expected.reshape(got.shape), rtol=1e-5, atol=1e-5)


def test_tokens_per_tile_is_num_image_token():
    config = _hf_config(image_size=448)
    assert _ours(config).config.tokens_per_tile == 256  # InternVL2.5's num_image_token
    assert _ours(_hf_config(image_size=56)).config.tokens_per_tile == 4


def test_position_embeddings_interpolate_to_other_grids(hf_vision_tower):
    """A 42x70 input (3x5 patches) on a 4x4-position checkpoint: bicubic interpolation as HF."""
    config = _hf_config()
    hf = _hf_model(config, hf_vision_tower)
    ours = _ours(config)
    ours.load_weights(_hf_state(hf).items(), hf_native=True)
    pixels = torch.randn(2, 3, 42, 70, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf.vision_tower(pixel_values=pixels).last_hidden_state  # [2, 16, 32]
        got = ours.vision_model(pixels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise(hf_vision_tower):
    ours = _ours(_hf_config())
    with pytest.raises(ValueError, match="pixel_values must be"):
        ours(_pixels(2, 42), None)
    with pytest.raises(ValueError, match="grid_thw counts 3 tiles"):
        ours(_pixels(2, 56), torch.tensor([[3, 1, 1]]))
    with pytest.raises(ValueError, match="unexpected InternVL vision weight"):
        ours.load_weights([("vision_model.bogus", torch.zeros(1))])
    with pytest.raises(ValueError, match="norm_type"):
        InternViTConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=8, image_size=56,
                        patch_size=14, llm_hidden_size=8, norm_type="batch_norm")


def test_partial_qkv_is_reported_missing(hf_vision_tower):
    config = _hf_config()
    state = {k: v for k, v in _hf_state(_hf_model(config, hf_vision_tower)).items() if "k_proj" not in k}
    ours = _ours(config)
    missing = ours.expected_weight_names() - ours.load_weights(state.items(), hf_native=True)
    assert {n for n in missing if n.endswith("attn.qkv.weight")}
