"""Qwen2_5_VisionTransformer against transformers' Qwen2_5_VisionTransformerPretrainedModel (float32,
CPU): window attention over grids that are and are not multiples of the window, videos, tiny images."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.vision_utils import get_vision_window_index

from vision.towers import Qwen2_5_VisionTransformer
from vision.towers.qwen2_5_vl import qwen2_5_vl_layout

# window_size // spatial_merge_size // patch_size = window side in merge units
VARIANTS = [
    pytest.param(
        dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=40, out_hidden_size=48, patch_size=4,
             window_size=16, fullatt_block_indexes=[1]),
        [(1, 10, 6), (3, 4, 8), (1, 2, 2), (1, 8, 8), (2, 12, 6)],
        id="window2units-full1",
    ),
    pytest.param(
        dict(depth=3, hidden_size=48, num_heads=4, intermediate_size=56, out_hidden_size=24, patch_size=2,
             window_size=12, fullatt_block_indexes=[0, 2], temporal_patch_size=1),
        [(1, 14, 10), (2, 6, 6), (1, 2, 4), (1, 12, 12)],
        id="window3units-full0,2-t1",
    ),
    pytest.param(
        dict(depth=2, hidden_size=16, num_heads=1, intermediate_size=24, out_hidden_size=32, patch_size=14,
             window_size=112, fullatt_block_indexes=[], hidden_act="gelu_pytorch_tanh"),
        [(1, 20, 18), (2, 4, 10), (1, 2, 2)],
        id="real-patch-window4units-all-windowed",
    ),
    pytest.param(
        dict(depth=2, hidden_size=24, num_heads=2, intermediate_size=24, out_hidden_size=16, patch_size=2,
             window_size=6, spatial_merge_size=3, fullatt_block_indexes=[0]),
        [(1, 9, 6), (2, 3, 3), (1, 3, 12)],
        id="merge3-window1unit",
    ),
]


def _ours_from(hf_model, config) -> Qwen2_5_VisionTransformer:
    ours = Qwen2_5_VisionTransformer(config)
    loaded = ours.load_weights(hf_model.state_dict().items())
    assert loaded == ours.expected_weight_names()
    return ours.eval()


@pytest.mark.parametrize("config_kwargs, grids", VARIANTS)
def test_matches_transformers(config_kwargs, grids, hf_vision_tower, patch_inputs):
    config = Qwen2_5_VLVisionConfig(**config_kwargs)
    hf_model = hf_vision_tower(Qwen2_5_VisionTransformerPretrainedModel, config)
    ours = _ours_from(hf_model, config)
    pixel_values, grid_thw = patch_inputs(config, grids)
    with torch.no_grad():
        expected = hf_model(pixel_values, grid_thw=grid_thw).pooler_output
        actual = ours(pixel_values, grid_thw)
    merge = config.spatial_merge_size
    assert actual.shape == (int(grid_thw.prod(-1).sum()) // merge**2, config.out_hidden_size)
    assert expected.abs().mean() > 0.1
    # float32 rounding noise (a 1176-term patch matmul, then depth) scales with the outputs' size
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("config_kwargs, grids", VARIANTS)
def test_window_layout_matches_transformers(config_kwargs, grids):
    config = Qwen2_5_VLVisionConfig(**config_kwargs)
    merge = config.spatial_merge_size
    grid_thw = torch.tensor(grids)
    window_index, cu_window_seqlens = get_vision_window_index(grid_thw, merge, config.window_size, config.patch_size)
    key = tuple(tuple(item) for item in grids)
    layout = qwen2_5_vl_layout(key, merge, config.window_size // merge // config.patch_size, torch.device("cpu"))
    assert torch.equal(layout.window_index, window_index)
    assert torch.equal(layout.cu_window_seqlens, cu_window_seqlens)
    assert torch.equal(layout.window_index[layout.reverse_index], torch.arange(len(window_index)))


def test_weight_names_match_the_full_checkpoint_layout():
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=40, out_hidden_size=64,
                           patch_size=4, window_size=16, fullatt_block_indexes=[1]),
        text_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=128, rope_parameters={"rope_type": "default",
                         "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}),
    )
    with torch.device("meta"):
        full_model = Qwen2_5_VLForConditionalGeneration(config)
        ours = Qwen2_5_VisionTransformer(config.vision_config)
    prefix = "model.visual."
    visual_names = {name[len(prefix):] for name in full_model.state_dict() if name.startswith(prefix)}
    assert visual_names == ours.expected_weight_names()


def test_load_weights_rejects_unknown_names():
    config = Qwen2_5_VLVisionConfig(depth=1, hidden_size=16, num_heads=2, intermediate_size=8, out_hidden_size=8,
                                    patch_size=2, window_size=8, fullatt_block_indexes=[0])
    ours = Qwen2_5_VisionTransformer(config)
    gate_bias = torch.randn(8)
    assert ours.load_weights([("blocks.0.mlp.gate_proj.bias", gate_bias)]) == {"blocks.0.mlp.gate_proj.bias"}
    loaded = ours.blocks[0].mlp.gate_proj.bias.detach()   # the hidden width is zero-padded 8 -> 16
    assert torch.equal(loaded[:8], gate_bias) and not loaded[8:].any()
    with pytest.raises(ValueError, match="shape mismatch"):
        ours.load_weights([("blocks.0.mlp.down_proj.weight", torch.zeros(16, 16))])   # checkpoint is [16, 8]
    with pytest.raises(ValueError, match="blocks.0.norm1.bias"):  # RMSNorm has no bias (Qwen2-VL's LayerNorm has)
        ours.load_weights([("blocks.0.norm1.bias", torch.zeros(16))])


def test_rejects_a_window_smaller_than_a_merge_unit():
    with pytest.raises(ValueError, match="window_size"):
        Qwen2_5_VisionTransformer(Qwen2_5_VLVisionConfig(depth=1, hidden_size=16, num_heads=2, patch_size=14,
                                                         window_size=20))


def test_layout_cached_under_inference_mode_works_with_autograd(patch_inputs):
    """The cached window_index is used as an index (saved for backward): it must not be an
    inference tensor even when the cache was filled under torch.inference_mode()."""
    config = Qwen2_5_VLVisionConfig(depth=1, hidden_size=16, num_heads=2, intermediate_size=8, out_hidden_size=8,
                                    patch_size=2, window_size=8, fullatt_block_indexes=[0])
    ours = Qwen2_5_VisionTransformer(config)
    pixel_values, grid_thw = patch_inputs(config, [(1, 6, 2), (2, 2, 4), (1, 14, 2)])
    with torch.inference_mode():
        ours(pixel_values, grid_thw)  # fills the layout cache for these grids
    ours(pixel_values, grid_thw).sum().backward()
    assert ours.patch_embed.proj.weight.grad is not None
