"""kernels.apply_rotary: the reference against transformers' own RoPE code (Qwen2RotaryEmbedding +
apply_rotary_pos_emb for 1-D positions; Qwen2VLRotaryEmbedding's M-RoPE recomposition for 3-row
positions; Qwen3VLTextRotaryEmbedding's interleaved layout); the Triton kernel against the
reference in the interpreter (child process)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2VLConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

import vlserve_kernels as kernels


def _cos_sin_cache(inv_freq: torch.Tensor, max_position: int) -> torch.Tensor:
    """[max_position, head_dim]: cos | sin of position * inv_freq, as the engine builds it."""
    freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _q_k(num_tokens, num_q_heads, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(num_tokens)
    return (torch.randn(num_tokens, num_q_heads, head_dim, generator=gen),
            torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen))


def test_1d_positions_match_hf_qwen2():
    config = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    rope = Qwen2RotaryEmbedding(config)
    query, key = _q_k(6, 4, 2, 16)
    positions = torch.tensor([0, 5, 6, 7, 30, 2])
    cos, sin = rope(query, positions[None])                                  # [1, T, head_dim]
    hf_q, hf_k = apply_rotary_pos_emb(query.transpose(0, 1)[None], key.transpose(0, 1)[None], cos, sin)
    q_out, k_out = kernels.apply_rotary(query, key, positions, _cos_sin_cache(rope.inv_freq, 64))
    torch.testing.assert_close(q_out, hf_q[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_out, hf_k[0].transpose(0, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mrope_section", [[2, 3, 3], [4, 2, 2]])
def test_mrope_matches_hf_qwen2_vl(mrope_section):
    config = Qwen2VLConfig(text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                            rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                 mrope_section=mrope_section)))
    rope = Qwen2VLRotaryEmbedding(config.text_config)
    query, key = _q_k(5, 4, 2, 16)
    positions = torch.tensor([[0, 3, 3, 3, 9], [0, 3, 4, 5, 9], [0, 7, 3, 6, 9]])  # temporal / height / width
    cos, sin = rope(query, positions[:, None])                               # [1, T, head_dim]
    hf_q, hf_k = apply_rotary_pos_emb(query.transpose(0, 1)[None], key.transpose(0, 1)[None], cos, sin)
    q_out, k_out = kernels.apply_rotary(query, key, positions, _cos_sin_cache(rope.inv_freq, 16), mrope_section)
    torch.testing.assert_close(q_out, hf_q[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_out, hf_k[0].transpose(0, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mrope_section", [[2, 3, 3], [24, 20, 20]])
def test_interleaved_mrope_matches_hf_qwen3_vl(mrope_section):
    """Qwen3-VL: t/h/w frequencies interleaved (Qwen3VLTextRotaryEmbedding.recomposition_frequencies)."""
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    head_dim = 2 * sum(mrope_section)
    config = Qwen3VLConfig(text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=head_dim, rope_parameters=dict(
                                                rope_type="default", rope_theta=5e6, mrope_section=mrope_section,
                                                mrope_interleaved=True)))
    rope = Qwen3VLTextRotaryEmbedding(config.text_config)
    query, key = _q_k(5, 4, 2, head_dim)
    positions = torch.tensor([[0, 3, 3, 3, 9], [0, 3, 4, 5, 9], [0, 7, 3, 6, 9]])  # temporal / height / width
    cos, sin = rope(query, positions[:, None])                               # [1, T, head_dim]
    hf_q, hf_k = apply_rotary_pos_emb(query.transpose(0, 1)[None], key.transpose(0, 1)[None], cos, sin)
    q_out, k_out = kernels.apply_rotary(query, key, positions, _cos_sin_cache(rope.inv_freq, 16), mrope_section,
                                        mrope_interleaved=True)
    torch.testing.assert_close(q_out, hf_q[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_out, hf_k[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    blocks, _ = kernels.apply_rotary(query, key, positions, _cos_sin_cache(rope.inv_freq, 16), mrope_section)
    assert not torch.allclose(blocks, q_out)  # the layouts differ: the test can tell them apart


def test_rejects_positions_that_do_not_match_mrope():
    query, key = _q_k(2, 2, 1, 8)
    with pytest.raises(ValueError, match="mrope_section"):
        kernels.apply_rotary(query, key, torch.zeros(3, 2, dtype=torch.long), torch.zeros(4, 8))


def test_triton_kernel_in_interpreter(run_interpreted_cases):
    run_interpreted_cases("rotary_cases.py")
