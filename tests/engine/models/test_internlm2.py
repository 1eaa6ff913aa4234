"""InternLM2ForCausalLM vs a reference written here from InternLM2's published modeling code
(transformers has no InternLM2 class): packed group-interleaved wqkv, rotate-half RoPE, RMSNorm,
SwiGLU; float32 logits of a ragged prefill, then decode steps through a non-contiguous paged cache."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.models.internlm2 import InternLM2ForCausalLM
from engine.weights import load_checked
from tests.engine.models.test_qwen2 import BLOCK_SIZE, NUM_BLOCKS, metadata


def _config(num_heads, num_kv_heads, tied, bias):
    return SimpleNamespace(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                           num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, rms_norm_eps=1e-6,
                           max_position_embeddings=128, rope_theta=1000.0, hidden_act="silu", bias=bias,
                           tie_word_embeddings=tied, rope_scaling={"type": "dynamic", "factor": 2.0})


def _weights(config, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, inter, d = config.hidden_size, config.intermediate_size, config.hidden_size // config.num_attention_heads
    qkv_rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * d

    def rand(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    w = {"model.tok_embeddings.weight": rand(config.vocab_size, h, scale=0.5), "model.norm.weight": 1 + rand(h, scale=0.1)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        w.update({p + "attention.wqkv.weight": rand(qkv_rows, h), p + "attention.wo.weight": rand(h, h),
                  p + "feed_forward.w1.weight": rand(inter, h), p + "feed_forward.w3.weight": rand(inter, h),
                  p + "feed_forward.w2.weight": rand(h, inter), p + "attention_norm.weight": 1 + rand(h, scale=0.1),
                  p + "ffn_norm.weight": 1 + rand(h, scale=0.1)})
        if config.bias:
            w.update({p + "attention.wqkv.bias": rand(qkv_rows, scale=0.1), p + "attention.wo.bias": rand(h, scale=0.1)})
    if not config.tie_word_embeddings:
        w["output.weight"] = rand(config.vocab_size, h, scale=0.5)
    return w


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def reference_logits(config, w, ids: torch.Tensor) -> torch.Tensor:
    """InternLM2ForCausalLM.forward (modeling_internlm2.py), one causal sequence [L] -> [L, vocab]."""
    n, kv = config.num_attention_heads, config.num_key_value_heads
    d, groups, length = config.hidden_size // n, n // kv, len(ids)
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(length).float()[:, None] * inv_freq
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()  # [L, d]
    x = w["model.tok_embeddings.weight"][ids]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        hidden = _rms(x, w[p + "attention_norm.weight"], config.rms_norm_eps)
        qkv = hidden @ w[p + "attention.wqkv.weight"].T + (w[p + "attention.wqkv.bias"] if config.bias else 0)
        qkv = qkv.view(length, kv, groups + 2, d)             # "b q (h gs d) -> b q h gs d"
        q = qkv[:, :, :groups].reshape(length, n, d)           # "b q h gs d -> b q (h gs) d"
        k, v = qkv[:, :, -2], qkv[:, :, -1]                    # [L, kv, d]
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / d**0.5
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(length, n * d)
        x = x + attn @ w[p + "attention.wo.weight"].T + (w[p + "attention.wo.bias"] if config.bias else 0)
        hidden = _rms(x, w[p + "ffn_norm.weight"], config.rms_norm_eps)
        gate, up = hidden @ w[p + "feed_forward.w1.weight"].T, hidden @ w[p + "feed_forward.w3.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "feed_forward.w2.weight"].T
    head = w["model.tok_embeddings.weight"] if config.tie_word_embeddings else w["output.weight"]
    return _rms(x, w["model.norm.weight"], config.rms_norm_eps) @ head.T


@pytest.mark.parametrize("num_heads,num_kv_heads,tied,bias", [(4, 2, False, False), (6, 3, True, True),
                                                              (4, 4, False, True)])
@torch.no_grad()
def test_prefill_then_decode_matches_reference(num_heads, num_kv_heads, tied, bias):
    config = _config(num_heads, num_kv_heads, tied, bias)
    w = _weights(config)
    model = InternLM2ForCausalLM(config).float()
    load_checked(model, w.items())
    head_dim = config.hidden_size // num_heads
    shape = (NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim)
    kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]
    prompts = [torch.randint(0, 211, (9,)), torch.randint(0, 211, (5,))]
    tables = [[7, 2, 11, 4], [13, 1, 20]]
    lens = [len(p) for p in prompts]
    hidden = model(torch.cat(prompts), torch.cat([torch.arange(n) for n in lens]), metadata(lens, lens, tables),
                   kv_caches)
    logits = model.compute_logits(hidden)
    for r, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[sum(lens[:r]):sum(lens[:r + 1])], reference_logits(config, w, prompt),
                                   atol=1e-5, rtol=1e-5)
    for _ in range(3):  # decode: one token per request
        nxt = [int(logits[sum(lens[:r + 1]) - 1].argmax()) for r in range(len(prompts))]
        prompts = [torch.cat([p, torch.tensor([t])]) for p, t in zip(prompts, nxt)]
        lens = [len(p) for p in prompts]
        hidden = model(torch.tensor(nxt), torch.tensor([n - 1 for n in lens]), metadata([1, 1], lens, tables),
                       kv_caches)
        step = model.compute_logits(hidden)
        for r, prompt in enumerate(prompts):
            torch.testing.assert_close(step[r], reference_logits(config, w, prompt)[-1], atol=1e-5, rtol=1e-5)
        logits = torch.zeros(sum(lens), step.shape[1])
        for r in range(len(prompts)):
            logits[sum(lens[:r + 1]) - 1] = step[r]


def test_unsupported_rope_scaling_raises():
    config = _config(4, 2, False, False)
    config.rope_scaling = {"type": "yarn", "factor": 2.0}
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        InternLM2ForCausalLM(config)
