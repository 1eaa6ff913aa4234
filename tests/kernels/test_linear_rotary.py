"""kernels.batch_invariant_qkv_rotary_store_kv: the CPU reference is the projection, then HF's
rotate_half rotary on q and k, with the rotated k and v in the cache slots; the fused Triton launch
against the product then kernels.rotary_store_kv in the interpreter (interpreted/linear_rotary_cases.py,
run in a child process)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

import kernels


def _inputs(num_tokens=5, num_q_heads=4, num_kv_heads=2, head_dim=16, depth=24):
    gen = torch.Generator().manual_seed(7)
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    x, weight, bias = (torch.randn(num_tokens, depth, generator=gen), torch.randn(width, depth, generator=gen),
                       torch.randn(width, generator=gen))
    freqs = torch.arange(32.0)[:, None] / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    cos_sin_cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)                       # [32, head_dim]
    positions = torch.randint(0, 32, (num_tokens,), generator=gen)
    caches = [torch.zeros(3, 4, num_kv_heads, head_dim) for _ in range(2)]
    return x, weight, bias, cos_sin_cache, positions, caches


def test_reference_is_the_projection_then_hf_rotary_and_cache_write():
    x, weight, bias, cos_sin_cache, positions, (k_cache, v_cache) = _inputs()
    slots = torch.tensor([5, -1, 0, 11, 2])
    query = kernels.batch_invariant_qkv_rotary_store_kv(x, weight, bias, 4, 2, positions, cos_sin_cache, k_cache,
                                                        v_cache, slots)
    qkv = torch.nn.functional.linear(x, weight, bias)                                   # [5, 8 * 16]
    q, k, v = (t.view(5, -1, 16).transpose(0, 1)[None] for t in qkv.split([64, 32, 32], dim=-1))  # [1, H, 5, 16]
    half = cos_sin_cache[positions]                                                     # [5, 16]: cos | sin
    cos, sin = half[:, :8].repeat(1, 2)[None], half[:, 8:].repeat(1, 2)[None]         # HF's cat(f, f)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(query, q_hf[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            torch.testing.assert_close(k_cache[slot // 4, slot % 4], k_hf[0, :, token], rtol=1e-6, atol=1e-6)
            assert torch.equal(v_cache[slot // 4, slot % 4], v[0, :, token])
    assert k_cache.flatten(0, 1)[[1, 3, 4]].abs().sum() == 0      # slots nobody wrote stay untouched


def test_rejects_positions_that_do_not_match_mrope():
    x, weight, bias, cos_sin_cache, positions, (k_cache, v_cache) = _inputs()
    with pytest.raises(ValueError, match="mrope_section"):
        kernels.batch_invariant_qkv_rotary_store_kv(x, weight, bias, 4, 2, positions, cos_sin_cache, k_cache,
                                                    v_cache, torch.arange(5), mrope_section=[2, 3, 3])


def test_triton_kernel_in_interpreter(run_interpreted_cases):
    run_interpreted_cases("linear_rotary_cases.py")
