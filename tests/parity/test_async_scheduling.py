"""Async scheduling (step N+1 scheduled and launched before step N's tokens reach the host) against
transformers, float32 on the CPU: the same 16 text prompts as test_text_parity under defaults,
chunked prefill, preemption (counted), prefix caching twice, an abort while a step is in flight,
and a repetition-penalty request (which makes the engine wait for its tokens) against transformers'
generate; images and video (Qwen2.5-VL) with chunks cutting through them. All blocks free after.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import SamplingParams
from engine.protocol import EngineRequest, FinishReason
from test_text_parity import (GREEDY, PROMPT_LENGTHS, SHARED_PREFIX_LEN, assert_all_blocks_free,
                              assert_matches_reference, make_llm, model_dir, prompts, reference, run)

__all__ = ["model_dir", "prompts", "reference"]   # fixtures shared with test_text_parity


def make_async_llm(model_dir, **kwargs):
    llm = make_llm(model_dir, async_scheduling=True, **kwargs)
    assert llm.client.core.async_scheduling
    return llm


def test_defaults(model_dir, prompts, reference):
    llm = make_async_llm(model_dir)
    assert_matches_reference(run(llm, prompts), reference)
    assert_all_blocks_free(llm)


def test_chunked_prefill(model_dir, prompts, reference):
    llm = make_async_llm(model_dir, max_num_batched_tokens=32)
    assert_matches_reference(run(llm, prompts), reference)
    assert_all_blocks_free(llm)


def test_preemption(model_dir, prompts, reference):
    llm = make_async_llm(model_dir, num_gpu_blocks_override=40, kv_cache_memory_bytes=None,
                         enable_prefix_caching=False)
    assert_matches_reference(run(llm, prompts), reference)
    assert assert_all_blocks_free(llm).num_preemptions > 0


def test_prefix_caching_twice(model_dir, prompts, reference):
    llm = make_async_llm(model_dir, enable_prefix_caching=True)
    assert_matches_reference(run(llm, prompts), reference)
    first = assert_all_blocks_free(llm).prefix_cache_hits
    assert_matches_reference(run(llm, prompts), reference)
    hits = assert_all_blocks_free(llm).prefix_cache_hits - first
    assert hits >= SHARED_PREFIX_LEN * sum(n >= 128 for n in PROMPT_LENGTHS)


def test_abort_while_a_step_is_in_flight(model_dir, prompts, reference):
    llm = make_async_llm(model_dir, max_num_batched_tokens=64)
    client = llm.client
    for i in (0, 3, 6):
        client.add_request(EngineRequest(f"r{i}", prompts[i], GREEDY))
    tokens: dict[str, list[int]] = {"r0": [], "r3": [], "r6": []}
    finished: set[str] = set()
    for step in range(200):
        if step == 4:
            assert client.core._inflight is not None   # the abort lands between launch and result
            client.abort_requests(["r3"])
        for output in client.step().outputs:
            assert output.finish_reason != FinishReason.ERROR, output.error
            tokens[output.req_id] += output.new_token_ids
            if output.finish_reason is not None:
                finished.add(output.req_id)
        if not client.has_unfinished_requests():
            break
    assert finished == {"r0", "r6"}
    assert tokens["r0"] == reference[0][0] and tokens["r6"] == reference[6][0]
    assert len(tokens["r3"]) < len(reference[3][0])
    assert_all_blocks_free(llm)


@torch.no_grad()
def test_repetition_penalty_waits_for_tokens_and_matches_transformers(model_dir, prompts):
    llm = make_async_llm(model_dir)
    penalised = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, repetition_penalty=1.5)
    params = [GREEDY] * 6
    params[2] = penalised
    outputs = run(llm, prompts[:6], params)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = model.generate(torch.tensor([prompts[2]]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                              repetition_penalty=1.5)[0, len(prompts[2]):].tolist()
    assert outputs[2].outputs[0].token_ids == expected
    assert_all_blocks_free(llm)


@pytest.fixture(scope="module")
def vl_model_and_reference(tiny_model_dir):
    import test_vl_parity as vl

    model = str(tiny_model_dir("qwen2_5_vl"))
    cases = vl.make_cases()
    refs = vl.hf_generate(model, [vl.ref_request(case) for case in cases.values()], vl.NUM_NEW_TOKENS,
                          top_k=vl.TOP_K, ignore_eos=True)
    return model, cases, dict(zip(cases, refs))


@pytest.mark.parametrize("kwargs", [{"max_num_batched_tokens": 24}, {"num_gpu_blocks_override": 0}],
                         ids=["chunked_24", "scarce_kv"])
def test_images_and_video(vl_model_and_reference, kwargs):
    import test_vl_parity as vl

    model, cases, reference_vl = vl_model_and_reference
    if kwargs.get("num_gpu_blocks_override") == 0:   # the longest request alone fits: preemption
        longest = max(len(ref.prompt_token_ids) for ref in reference_vl.values()) + vl.NUM_NEW_TOKENS
        kwargs = {"num_gpu_blocks_override": -(-longest // vl.BLOCK_SIZE) + 2}
    llm = vl.make_llm(model, async_scheduling=True, **kwargs)
    assert llm.client.core.async_scheduling
    _, stats, _ = vl.run_all(llm, cases, reference_vl)
    assert "num_gpu_blocks_override" not in kwargs or stats.num_preemptions > 0


@pytest.mark.parametrize("seed", [4321])
def test_seeded_sampling_is_the_same_alone_sync_and_in_an_async_batch(model_dir, prompts, seed):
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=seed, max_tokens=12, ignore_eos=True)
    alone = run(make_llm(model_dir, async_scheduling=False), [prompts[5]], sampled)[0].outputs[0].token_ids
    batch_params = [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)] * len(prompts)
    batch_params[5] = sampled
    llm = make_async_llm(model_dir)
    assert run(llm, prompts, batch_params)[5].outputs[0].token_ids == alone
    assert_all_blocks_free(llm)
