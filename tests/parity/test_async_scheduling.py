"""Async scheduling (step N+1 scheduled and launched before step N's tokens reach the host) against
transformers, float32 on the CPU: the same 16 text prompts as test_text_parity under defaults,
chunked prefill, preemption (counted), prefix caching twice, an abort while a step is in flight,
and penalised requests (repetition against transformers' generate, frequency / presence against a
greedy loop over its logits), whose steps are prepared ahead like any other; images and video (Qwen2.5-VL) with chunks cutting through them. All blocks free after.
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


def _greedy_with_openai_penalties(model, prompt: list[int], max_new_tokens: int, frequency: float,
                                  presence: float) -> list[int]:
    """The oracle of frequency / presence penalties (OpenAI's definition, which transformers'
    generate has not): a greedy loop over the model's own logits."""
    tokens, out = list(prompt), []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([tokens])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        token = int((logits - frequency * counts - presence * (counts > 0).float()).argmax())
        out.append(token)
        tokens.append(token)
    return out


def _prompt_whose_first_token_repeats(model, vocab_size: int, length: int = 24) -> list[int]:
    """A random prompt whose unpenalised greedy output starts with the same token twice (a token not
    in the prompt): the second step's penalty must count the first step's token, which is still on
    the device when async scheduling prepares that step."""
    generator = torch.Generator().manual_seed(7)
    for _ in range(1000):
        prompt = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
        first, second = model.generate(torch.tensor([prompt]), max_new_tokens=2, min_new_tokens=2,
                                       do_sample=False)[0, length:].tolist()
        if first == second and first not in prompt:
            return prompt
    raise AssertionError("no prompt of the tiny model repeats its first output token")


@torch.no_grad()
def test_penalties_run_ahead_and_match_transformers(model_dir, prompts, monkeypatch):
    """Penalised requests do not make the engine wait for their tokens: each step's penalties count
    the token still on the device from there (sampling_rows._output_token_ids is seen building rows
    with a pending token), and the tokens still match transformers on a prompt where a penalty that
    missed that token would sample it again."""
    from engine.runner import sampling_rows

    build = sampling_rows._output_token_ids
    pending_rows = []

    def spy(states, to_device, pending, uploads_ready):
        pending_rows.extend(state.req_id for state in states if state.num_pending)
        return build(states, to_device, pending, uploads_ready)

    monkeypatch.setattr(sampling_rows, "_output_token_ids", spy)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    repeating = _prompt_whose_first_token_repeats(model, model.config.vocab_size)
    batch = list(prompts[:6])
    batch[2] = batch[4] = repeating
    params = [GREEDY] * 6
    params[2] = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, repetition_penalty=1.5)
    params[4] = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, frequency_penalty=0.7,
                               presence_penalty=0.4)
    llm = make_async_llm(model_dir)
    outputs = run(llm, batch, params)
    expected = model.generate(torch.tensor([repeating]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                              repetition_penalty=1.5)[0, len(repeating):].tolist()
    assert outputs[2].outputs[0].token_ids == expected
    assert outputs[4].outputs[0].token_ids == _greedy_with_openai_penalties(model, repeating, 10, 0.7, 0.4)
    assert len(pending_rows) >= 2 * 8   # both penalised requests, nearly every decode step
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
