"""Qwen2ForCausalLM vs transformers' Qwen2ForCausalLM in float32: full-prompt logits, then decode
steps through a paged cache whose block table is not contiguous."""

import pytest
import torch
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM as HFQwen2

from engine.layers.attention import AttentionMetadata
from engine.models.qwen2 import Qwen2ForCausalLM
from engine.weights import load_checked

BLOCK_SIZE = 4
NUM_BLOCKS = 32


def make_hf_model(num_heads, num_kv_heads, head_dim, tied, vocab_size, seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
                         max_position_embeddings=256, tie_word_embeddings=tied, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    hf = HFQwen2(config).float().eval()
    with torch.no_grad():   # HF zero-initialises biases and ones norms: randomise everything
        for name, param in hf.named_parameters():
            param.normal_(0, 0.15)
            if "norm" in name:
                param.add_(1.0)
    return config, hf


def load_ours(config, hf):
    model = Qwen2ForCausalLM(config).float()
    load_checked(model, hf.state_dict().items())
    return model


def make_kv_caches(config):
    shape = (NUM_BLOCKS, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_hidden_layers)]


def metadata(query_lens, seq_lens, block_tables):
    """Hand-built ragged batch: request r computes the last query_lens[r] of seq_lens[r] tokens."""
    slots = []
    for q_len, seq_len, table in zip(query_lens, seq_lens, block_tables):
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(seq_len - q_len, seq_len)]
    width = max(len(t) for t in block_tables)
    return AttentionMetadata(
        query_start_loc=torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), num_reqs=len(query_lens),
        num_actual_tokens=sum(query_lens), query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens))


CONFIGS = [  # (num_heads, num_kv_heads, head_dim, tied, vocab_size)
    (4, 4, 16, True, 250),
    (4, 2, 32, False, 317),
    (8, 2, 16, True, 199),
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,tied,vocab_size", CONFIGS)
@torch.no_grad()
def test_prefill_then_decode_matches_transformers(num_heads, num_kv_heads, head_dim, tied, vocab_size):
    config, hf = make_hf_model(num_heads, num_kv_heads, head_dim, tied, vocab_size)
    model = load_ours(config, hf)
    kv_caches = make_kv_caches(config)
    prompts = [torch.randint(0, vocab_size, (11,)), torch.randint(0, vocab_size, (6,))]
    tables = [[9, 3, 17, 5, 22], [14, 1, 30]]      # non-contiguous, interleaved between requests
    lens = [len(p) for p in prompts]
    ids = torch.cat(prompts)
    positions = torch.cat([torch.arange(n) for n in lens])
    hidden = model(ids, positions, metadata(lens, lens, tables), kv_caches)
    logits = model.compute_logits(hidden)
    for r, prompt in enumerate(prompts):
        expected = hf(prompt[None]).logits[0]
        start = sum(lens[:r])
        torch.testing.assert_close(logits[start:start + lens[r]], expected, atol=1e-5, rtol=1e-5)
    sequences = [p.tolist() for p in prompts]
    for _ in range(4):   # decode: one new token per request, attending through the cache
        new = [int(torch.randint(0, vocab_size, ())) for _ in sequences]
        for seq, token in zip(sequences, new):
            seq.append(token)
        seq_lens = [len(s) for s in sequences]
        positions = torch.tensor([n - 1 for n in seq_lens])
        hidden = model(torch.tensor(new), positions, metadata([1, 1], seq_lens, tables), kv_caches)
        logits = model.compute_logits(hidden)
        for r, seq in enumerate(sequences):
            expected = hf(torch.tensor(seq)[None]).logits[0, -1]
            torch.testing.assert_close(logits[r], expected, atol=1e-5, rtol=1e-5)


def test_tied_lm_head_shares_the_embedding_and_untied_does_not():
    config, hf = make_hf_model(4, 2, 16, True, 130)
    tied = load_ours(config, hf)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(tied.named_parameters())
    config, hf = make_hf_model(4, 2, 16, False, 130)
    untied = load_ours(config, hf)
    torch.testing.assert_close(untied.lm_head.weight, hf.lm_head.weight)
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_inputs_embeds_replace_the_token_embedding():
    config, hf = make_hf_model(4, 2, 16, False, 130)
    model = load_ours(config, hf)
    embeds = torch.randn(7, config.hidden_size)
    with torch.no_grad():
        hidden = model(None, torch.arange(7), metadata([7], [7], [[2, 6]]), make_kv_caches(config),
                       inputs_embeds=embeds)
        expected = hf(inputs_embeds=embeds[None]).logits[0]
    torch.testing.assert_close(model.compute_logits(hidden), expected, atol=1e-5, rtol=1e-5)
