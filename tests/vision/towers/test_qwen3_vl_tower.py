"""Qwen3VisionTransformer against transformers' Qwen3VLVisionModel (float32, CPU): learned position
embeddings resampled to grids smaller and larger than the table, non-square grids and videos, the
DeepStack rows, and the weight loading (every HF name, nothing else)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from vision.towers import Qwen3VisionTransformer

VARIANTS = [
    pytest.param(dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=40, patch_size=4,
                      num_position_embeddings=36, deepstack_visual_indexes=[0, 2]),
                 [(1, 10, 6), (3, 4, 8), (1, 2, 2), (1, 16, 14)], id="6x6-table-deepstack0,2"),
    pytest.param(dict(depth=2, hidden_size=24, num_heads=3, intermediate_size=32, out_hidden_size=16, patch_size=2,
                      num_position_embeddings=64, deepstack_visual_indexes=[1], temporal_patch_size=1,
                      hidden_act="gelu"),
                 [(2, 6, 6), (1, 4, 12), (1, 20, 2)], id="8x8-table-deepstack1-t1"),
]


@pytest.mark.parametrize("kwargs, grids", VARIANTS)
def test_matches_transformers(kwargs, grids):
    config = Qwen3VLVisionConfig(**kwargs)
    torch.manual_seed(0)
    hf = Qwen3VLVisionModel._from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0, 0.3)
    ours = Qwen3VisionTransformer(config)
    assert ours.load_weights(hf.state_dict().items()) == ours.expected_weight_names()
    grid_thw = torch.tensor(grids)
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    pixel_values = torch.randn(int(grid_thw.prod(-1).sum()), patch_dim)
    with torch.no_grad():
        expected = hf(pixel_values, grid_thw=grid_thw)
        got = ours.eval()(pixel_values, grid_thw)
    width = config.out_hidden_size
    assert got.shape == (len(pixel_values) // 4, width * (1 + len(config.deepstack_visual_indexes)))
    torch.testing.assert_close(got[:, :width], expected.pooler_output, rtol=1e-4, atol=1e-4)
    for j, feature in enumerate(expected.deepstack_features):
        torch.testing.assert_close(got[:, width * (j + 1):width * (j + 2)], feature, rtol=1e-4, atol=1e-4)


def test_unknown_or_misshapen_weights_are_refused():
    ours = Qwen3VisionTransformer(Qwen3VLVisionConfig(**VARIANTS[0].values[0]))
    with pytest.raises(ValueError, match="unexpected vision tower weight"):
        ours.load_weights([("merger.ln_q.weight", torch.zeros(32))])   # Qwen2-VL's merger name
    with pytest.raises(ValueError, match="pos_embed.weight"):
        ours.load_weights([("pos_embed.weight", torch.zeros(25, 32))])
    with pytest.raises(ValueError, match="square"):
        Qwen3VisionTransformer(Qwen3VLVisionConfig(**{**VARIANTS[0].values[0], "num_position_embeddings": 30}))
