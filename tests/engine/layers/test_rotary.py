"""RotaryEmbedding (plain and M-RoPE) vs transformers' Qwen2 / Qwen2-VL rotary embeddings."""

import pytest
import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

from engine.layers.rotary import RotaryEmbedding, rope_parameters


@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (32, 1e6)])
def test_rope_matches_qwen2(head_dim, theta):
    config = Qwen2Config(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                         max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": theta})
    assert rope_parameters(config) == (theta, None)
    positions = torch.tensor([0, 1, 5, 77, 300, 511])
    q, k = torch.randn(6, 4, head_dim), torch.randn(6, 2, head_dim)
    cos, sin = Qwen2RotaryEmbedding(config)(q, positions[None])            # [1, T, D]
    expected_q, expected_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    ours_q, ours_k = RotaryEmbedding(head_dim, 512, theta)(positions, q, k)
    torch.testing.assert_close(ours_q, expected_q[0].transpose(0, 1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours_k, expected_k[0].transpose(0, 1), atol=1e-6, rtol=1e-5)


def test_mrope_matches_qwen2_vl():
    config = Qwen2VLTextConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": [4, 6, 6]})
    theta, section = rope_parameters(config)
    assert section == [4, 6, 6]
    positions = torch.stack([torch.tensor([0, 1, 2, 2, 2, 2, 4]), torch.tensor([0, 1, 2, 2, 3, 3, 4]),
                             torch.tensor([0, 1, 2, 3, 2, 3, 4])])             # [3, T]
    q, k = torch.randn(7, 4, 32), torch.randn(7, 2, 32)
    cos, sin = Qwen2VLRotaryEmbedding(config)(q, positions[:, None, :])       # [1, T, D]
    expected_q, expected_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    ours_q, ours_k = RotaryEmbedding(32, 256, theta, section)(positions, q, k)
    torch.testing.assert_close(ours_q, expected_q[0].transpose(0, 1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours_k, expected_k[0].transpose(0, 1), atol=1e-6, rtol=1e-5)


def test_bad_rope_settings_are_errors():
    with pytest.raises(ValueError, match="must sum to head_dim/2"):
        RotaryEmbedding(32, 16, 10000.0, [4, 4, 4])
    config = Qwen2Config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                          "original_max_position_embeddings": 32768})
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        rope_parameters(config)
