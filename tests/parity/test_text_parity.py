"""Issue acceptance for text: the engine (engine.LLM) against transformers, float32 on the CPU.

16 prompts of 5..600 tokens submitted together must give greedy tokens identical to transformers'
Qwen2ForCausalLM and top-5 logprobs within 1e-4, under: defaults; chunked prefill
(max_num_batched_tokens=32); a KV cache too small for all of them (preemption); prefix caching
with shared prefixes (hits counted). After every run all KV blocks are free again.
"""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams

PROMPT_LENGTHS = [5, 7, 12, 20, 33, 50, 64, 90, 128, 150, 200, 256, 300, 420, 512, 600]
SHARED_PREFIX_LEN = 96   # prompts of >= 128 tokens start with the same 96 tokens (6 blocks of 16)
NUM_NEW_TOKENS = 8
TOP_K = 5
MAX_MODEL_LEN = 1024
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=TOP_K)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("qwen2"))


@pytest.fixture(scope="module")
def prompts(model_dir):
    generator = torch.Generator().manual_seed(1234)
    vocab = json.load(open(f"{model_dir}/config.json"))["vocab_size"]
    prefix = torch.randint(0, vocab, (SHARED_PREFIX_LEN,), generator=generator).tolist()
    result = []
    for length in PROMPT_LENGTHS:
        own = torch.randint(0, vocab, (length,), generator=generator).tolist()
        result.append((prefix + own)[:length] if length >= 128 else own)
    return result


@pytest.fixture(scope="module")
def reference(model_dir, prompts):
    """transformers' greedy tokens and top-5 logprobs per step, for each prompt (computed once)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return [_hf_greedy_with_logprobs(model, ids) for ids in prompts]


@torch.no_grad()
def _hf_greedy_with_logprobs(model, prompt_ids):
    tokens, top_logprobs = [], []
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    for _ in range(NUM_NEW_TOKENS):
        logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        top = torch.topk(logprobs, TOP_K)
        tokens.append(int(top.indices[0]))
        top_logprobs.append(list(zip(top.indices.tolist(), top.values.tolist())))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, top_logprobs


def assert_matches_reference(outputs, reference):
    assert len(outputs) == len(reference)
    for i, (output, (tokens, top_logprobs)) in enumerate(zip(outputs, reference)):
        completion = output.outputs[0]
        assert completion.token_ids == tokens, f"prompt {i} ({PROMPT_LENGTHS[i]} tokens)"
        for step, (entry, expected) in enumerate(zip(completion.logprobs, top_logprobs)):
            ranked = sorted((lp.rank, token_id) for token_id, lp in entry.items())[:TOP_K]
            assert [token_id for _, token_id in ranked] == [t for t, _ in expected], f"prompt {i} step {step}"
            for token_id, value in expected:
                assert abs(entry[token_id].logprob - value) < 1e-4, f"prompt {i} step {step}"


def assert_all_blocks_free(llm):
    stats = llm.client.stats()
    assert stats.num_running_reqs == 0 and stats.num_waiting_reqs == 0
    assert stats.num_free_blocks == stats.num_total_blocks > 0
    return stats


def make_llm(model_dir, **kwargs):
    kwargs.setdefault("kv_cache_memory_bytes", 32 << 20)
    return LLM(model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, **kwargs)


def run(llm, prompts, params=GREEDY):
    return llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)


@pytest.fixture(scope="module")
def default_llm(model_dir):
    return make_llm(model_dir)


def test_defaults(default_llm, prompts, reference):
    assert_matches_reference(run(default_llm, prompts), reference)
    assert_all_blocks_free(default_llm)


def test_chunked_prefill(model_dir, prompts, reference):
    llm = make_llm(model_dir, max_num_batched_tokens=32)
    assert_matches_reference(run(llm, prompts), reference)
    assert_all_blocks_free(llm)


def test_preemption_with_a_small_kv_cache(model_dir, prompts, reference):
    # 39 usable blocks of 16 = 624 tokens: the longest request (608) fits, all 16 (~3,000) do not.
    # Prefix caching off, so shared prefixes do not hide the shortage.
    llm = make_llm(model_dir, num_gpu_blocks_override=40, kv_cache_memory_bytes=None, enable_prefix_caching=False)
    assert_matches_reference(run(llm, prompts), reference)
    assert assert_all_blocks_free(llm).num_preemptions > 0


def test_prefix_caching_with_shared_prefixes(model_dir, prompts, reference):
    llm = make_llm(model_dir, enable_prefix_caching=True)
    assert_matches_reference(run(llm, prompts), reference)
    hits_after_first = assert_all_blocks_free(llm).prefix_cache_hits
    assert_matches_reference(run(llm, prompts), reference)  # now served from cached blocks
    stats = assert_all_blocks_free(llm)
    # At least every long prompt's shared prefix comes from the cache on the second pass.
    assert stats.prefix_cache_hits - hits_after_first >= SHARED_PREFIX_LEN * sum(n >= 128 for n in PROMPT_LENGTHS)


def test_seeded_sampling_is_batch_invariant(default_llm, prompts):
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=4321, max_tokens=12, ignore_eos=True)
    alone = run(default_llm, [prompts[5]], sampled)[0].outputs[0].token_ids
    batch_params = [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)] * len(prompts)
    batch_params[5] = sampled
    in_batch = run(default_llm, prompts, batch_params)[5].outputs[0].token_ids
    assert alone == in_batch and len(alone) == 12
    assert_all_blocks_free(default_llm)


def test_top_k_one_is_greedy_whatever_the_temperature(default_llm, prompts, reference):
    """transformers' sampling with top_k 1 keeps one token (TopKLogitsWarper): its greedy tokens. Rows
    with top-p and min-p too, beside rows that really sample (Qwen2.5-VL's generation config gives
    top_k 1 with temperature and top_p to every request that leaves them unset)."""
    params = [SamplingParams(temperature=t, top_k=1, top_p=p, min_p=m, seed=s, max_tokens=NUM_NEW_TOKENS,
                             ignore_eos=True) for t, p, m, s in [(0.7, 1.0, 0.0, 1), (1.5, 0.001, 0.0, 2),
                                                                (0.1, 0.5, 0.3, 3), (2.0, 1.0, 0.0, 4)]]
    params.append(SamplingParams(temperature=1.0, top_k=20, seed=5, max_tokens=NUM_NEW_TOKENS, ignore_eos=True))
    outputs = run(default_llm, prompts[:5], params)
    for output, (tokens, _) in zip(outputs[:4], reference[:4]):
        assert output.outputs[0].token_ids == tokens
    assert_all_blocks_free(default_llm)


@pytest.mark.parametrize("params, field", [
    (SamplingParams(max_tokens=0), "max_tokens"),
    (SamplingParams(temperature=-1.0), "temperature"),
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_p=1.5), "top_p"),
    (SamplingParams(n=0), "n"),
])
def test_bad_sampling_params_and_the_engine_keeps_serving(default_llm, prompts, reference, params, field):
    with pytest.raises(ValueError, match=field):
        run(default_llm, prompts[:2], params)
    assert_matches_reference(run(default_llm, prompts[:2]), reference[:2])


def test_prompt_longer_than_max_model_len(default_llm, prompts, reference):
    with pytest.raises(ValueError, match=f"maximum model length of {MAX_MODEL_LEN}"):
        run(default_llm, [prompts[0], [1] * MAX_MODEL_LEN])
    assert_matches_reference(run(default_llm, prompts[:1]), reference[:1])
    assert_all_blocks_free(default_llm)


def test_unknown_architecture(model_dir, tmp_path):
    broken = tmp_path / "unknown_arch"
    shutil.copytree(model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NotAModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="NotAModelForCausalLM"):
        LLM(str(broken), dtype="float32")
