"""Tiny Qwen2 at TP=2 and at PP=2 (a process per rank, gloo) against transformers: greedy tokens
identical, top-5 logprobs within 1e-4, with chunked prefill (16 tokens a step) and a KV cache too
small for all requests (preemption). Also a checkpoint with one KV head at TP=2 (replicated)."""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from conftest import GREEDY, NUM_NEW_TOKENS, TOP_K, assert_matches_reference, parallel_llm
from reference import hf_generate

PROMPTS = [list(range(40, 52)), [7, 300, 5, 19, 33, 801, 2, 64, 90, 17, 3, 3, 45, 600, 21, 8, 9, 10, 11, 12, 13, 14, 15],
           list(range(500, 541))]
# 4-token blocks: the three requests need 5 + 8 + 12 blocks to finish; 15 usable blocks force preemption.
SMALL_CACHE_BLOCKS = 16


def _run(model_dir, **parallel):
    with parallel_llm(model_dir, num_gpu_blocks_override=SMALL_CACHE_BLOCKS, max_model_len=60, **parallel) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        stats = llm.client.stats()
    assert stats.num_preemptions > 0
    assert stats.num_free_blocks == stats.num_total_blocks
    return outputs


def test_tp2_matches_transformers(qwen2_dir):
    references = hf_generate(qwen2_dir, PROMPTS, NUM_NEW_TOKENS, top_k=TOP_K, ignore_eos=True)
    assert_matches_reference(_run(qwen2_dir, tensor_parallel_size=2), references)


def test_pp2_matches_transformers(qwen2_dir):
    references = hf_generate(qwen2_dir, PROMPTS, NUM_NEW_TOKENS, top_k=TOP_K, ignore_eos=True)
    assert_matches_reference(_run(qwen2_dir, pipeline_parallel_size=2), references)


def test_single_kv_head_is_replicated_at_tp2(tmp_path):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=301, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=12, max_position_embeddings=128,
                         tie_word_embeddings=False, eos_token_id=300,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0, 0.3)
            if "norm" in name:
                param.add_(1.0)
    model.save_pretrained(tmp_path)
    prompts = [[5, 17, 200, 33, 9, 41, 1, 250], [90, 91, 92, 93, 7, 7, 7, 280, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
    references = hf_generate(tmp_path, prompts, NUM_NEW_TOKENS, top_k=TOP_K, ignore_eos=True)
    with parallel_llm(tmp_path, tensor_parallel_size=2, max_model_len=64, tokenizer=None) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert_matches_reference(outputs, references)
