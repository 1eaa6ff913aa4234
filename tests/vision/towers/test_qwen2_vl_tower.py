"""Qwen2VisionTransformer against transformers' Qwen2VisionTransformerPretrainedModel (float32, CPU),
and the checked weight loading."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from vision.towers import Qwen2VisionTransformer

# (config kwargs, grids (t, h, w) in patches)
VARIANTS = [
    pytest.param(
        dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=48, patch_size=4),
        [(1, 10, 6), (3, 4, 8), (1, 2, 2), (2, 6, 6)],
        id="merge2-quick_gelu-video",
    ),
    pytest.param(
        dict(depth=3, embed_dim=48, num_heads=4, mlp_ratio=3, hidden_size=40, patch_size=2,
             temporal_patch_size=1, in_channels=1, hidden_act="gelu"),
        [(1, 4, 12), (2, 2, 2), (1, 8, 4)],
        id="gelu-1channel-t1",
    ),
    pytest.param(
        dict(depth=1, embed_dim=24, num_heads=1, mlp_ratio=4, hidden_size=16, patch_size=3,
             spatial_merge_size=3, rope_parameters={"rope_type": "axial", "rope_theta": 500.0}),
        [(1, 6, 9), (1, 3, 3), (2, 3, 6)],
        id="merge3-one-head-theta500",
    ),
]


def _ours_from(hf_model, config) -> Qwen2VisionTransformer:
    ours = Qwen2VisionTransformer(config)
    loaded = ours.load_weights(hf_model.state_dict().items())
    assert loaded == ours.expected_weight_names()
    return ours.eval()


@pytest.mark.parametrize("config_kwargs, grids", VARIANTS)
def test_matches_transformers(config_kwargs, grids, hf_vision_tower, patch_inputs):
    config = Qwen2VLVisionConfig(**config_kwargs)
    hf_model = hf_vision_tower(Qwen2VisionTransformerPretrainedModel, config)
    ours = _ours_from(hf_model, config)
    pixel_values, grid_thw = patch_inputs(config, grids)
    with torch.no_grad():
        expected = hf_model(pixel_values, grid_thw=grid_thw).pooler_output
        actual = ours(pixel_values, grid_thw)
    merge = config.spatial_merge_size
    assert actual.shape == (int(grid_thw.prod(-1).sum()) // merge**2, config.hidden_size)
    assert expected.abs().mean() > 0.1  # a real signal, not a vanishing one
    # float32 rounding noise (a 1176-term patch matmul, then depth) scales with the outputs' size
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_items_do_not_see_each_other(hf_vision_tower, patch_inputs):
    """Each image's output equals that image encoded alone (per-item attention segments)."""
    config = Qwen2VLVisionConfig(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=48, patch_size=4)
    ours = _ours_from(hf_vision_tower(Qwen2VisionTransformerPretrainedModel, config), config)
    pixel_values, grid_thw = patch_inputs(config, [(1, 4, 6), (1, 6, 4)])
    with torch.no_grad():
        together = ours(pixel_values, grid_thw)
        first = ours(pixel_values[:24], grid_thw[:1])
        second = ours(pixel_values[24:], grid_thw[1:])
    torch.testing.assert_close(together, torch.cat([first, second]), rtol=1e-5, atol=1e-5)


def test_weight_names_match_the_full_checkpoint_layout():
    """The tower's names are the full model's `model.visual.*` names with the prefix stripped."""
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, patch_size=4),
        text_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=128, rope_parameters={"rope_type": "default",
                         "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}),
    )
    with torch.device("meta"):
        full_model = Qwen2VLForConditionalGeneration(config)
        ours = Qwen2VisionTransformer(config.vision_config)
    prefix = "model.visual."
    visual_names = {name[len(prefix):] for name in full_model.state_dict() if name.startswith(prefix)}
    assert visual_names == ours.expected_weight_names()


def test_load_weights_rejects_unknown_names_and_shapes():
    config = Qwen2VLVisionConfig(depth=1, embed_dim=16, num_heads=2, hidden_size=8, patch_size=2)
    ours = Qwen2VisionTransformer(config)
    qkv_bias = torch.randn(48)
    assert ours.load_weights([("blocks.0.attn.qkv.bias", qkv_bias)]) == {"blocks.0.attn.qkv.bias"}
    assert torch.equal(ours.blocks[0].attn.qkv.bias.detach(), qkv_bias)
    with pytest.raises(ValueError, match="blocks.1.attn.qkv.bias"):
        ours.load_weights([("blocks.1.attn.qkv.bias", qkv_bias)])
    with pytest.raises(ValueError, match="visual.merger.ln_q.weight"):
        ours.load_weights([("visual.merger.ln_q.weight", torch.ones(16))])
    with pytest.raises(ValueError, match="expected shape"):
        ours.load_weights([("merger.ln_q.weight", torch.ones(17))])
    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        ours.load_weights([("patch_embed.proj.weight", torch.ones(16, 3 * 2 * 2 * 2))])  # flat, not Conv3d


def test_rejects_inconsistent_inputs():
    config = Qwen2VLVisionConfig(depth=1, embed_dim=16, num_heads=2, hidden_size=8, patch_size=2)
    ours = Qwen2VisionTransformer(config)
    patch_dim = 3 * 2 * 2 * 2
    with pytest.raises(ValueError, match="spatial_merge_size"):
        ours(torch.randn(6, patch_dim), torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="pixel_values"):
        ours(torch.randn(5, patch_dim), torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match="hidden_act"):
        Qwen2VisionTransformer(Qwen2VLVisionConfig(depth=1, embed_dim=16, num_heads=2, hidden_act="relu6"))


def test_bf16_cast_keeps_rotary_frequencies_in_fp32(patch_inputs):
    """`tower.to(bfloat16)` must not round the rotary frequencies (transformers builds them in fp32)."""
    config = Qwen2VLVisionConfig(depth=1, embed_dim=32, num_heads=2, hidden_size=16, patch_size=2)
    ours = Qwen2VisionTransformer(config)
    positions = torch.tensor([[0, 0], [37, 5], [120, 99]])
    cos32, sin32 = ours.rotary_pos_emb(positions)
    ours.to(torch.bfloat16)
    cos16, sin16 = ours.rotary_pos_emb(positions)
    assert cos16.dtype == torch.float32 and torch.equal(cos16, cos32) and torch.equal(sin16, sin32)
    pixel_values, grid_thw = patch_inputs(config, [(1, 4, 4)])
    with torch.no_grad():
        assert ours(pixel_values, grid_thw).dtype == torch.bfloat16

