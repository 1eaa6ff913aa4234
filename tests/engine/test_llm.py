"""engine.LLM (vLLM's offline API) on the tiny Qwen2 checkpoint, float32 CPU. Oracle: transformers'
Qwen2ForCausalLM greedy decoding and the HF tokenizer / chat template."""

import random
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, RequestOutput, SamplingParams

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("qwen2"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32", max_model_len=256, num_gpu_blocks_override=64, max_num_seqs=8)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(hf_model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(num_tokens):
        ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_prompt_forms_in_input_order_match_hf(llm, hf_model):
    tokenizer = llm.get_tokenizer()
    prompts = ["The quick brown fox", {"prompt_token_ids": [11, 22, 33, 44, 55]}, {"prompt": "你好 world 🙂"}]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    prompt_ids = [tokenizer.encode(prompts[0]), [11, 22, 33, 44, 55], tokenizer.encode("你好 world 🙂")]
    assert all(isinstance(o, RequestOutput) and o.finished for o in outputs)
    for output, ids in zip(outputs, prompt_ids):
        completion = output.outputs[0]
        assert output.prompt_token_ids == ids
        assert completion.token_ids == hf_greedy(hf_model, ids, MAX_TOKENS)
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert completion.finish_reason == "length"
    assert outputs[0].prompt == prompts[0] and outputs[1].prompt is None


def test_stop_string_truncates_the_hf_text(llm, hf_model):
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode("Once upon a time")
    hf_text = tokenizer.decode(hf_greedy(hf_model, ids, MAX_TOKENS), skip_special_tokens=True)
    stop = hf_text[len(hf_text) // 2: len(hf_text) // 2 + 2]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, stop=[stop])
    completion = llm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
    assert completion.text == hf_text[:hf_text.index(stop)]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert llm.client.stats().num_free_blocks == llm.client.stats().num_total_blocks


def test_per_prompt_params_n_and_seeds(llm, hf_model):
    params = [GREEDY, SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=11, ignore_eos=True)]
    greedy_out, sampled_out = llm.generate(["a b c", "x y z"], params, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    assert greedy_out.outputs[0].token_ids == hf_greedy(hf_model, tokenizer.encode("a b c"), MAX_TOKENS)
    samples = [c.token_ids for c in sampled_out.outputs]
    assert [c.index for c in sampled_out.outputs] == [0, 1, 2] and all(len(s) == 6 for s in samples)
    assert len({tuple(s) for s in samples}) == 3  # children are seeded seed+i: they differ
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)


def test_logprobs_are_hf_log_softmax(llm, hf_model):
    ids = llm.get_tokenizer().encode("Hello there")
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=3)
    completion = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0]
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids + completion.token_ids])).logits[0, len(ids) - 1:-1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for position, (token_id, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        top = torch.topk(expected[position], 3)
        assert list(entry)[:3] == top.indices.tolist() and entry[token_id].rank == 1
        for token, value in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[token].logprob == pytest.approx(value, abs=1e-4)
    assert completion.cumulative_logprob == pytest.approx(
        sum(expected[p, t].item() for p, t in enumerate(completion.token_ids)), abs=1e-4)


def test_chat_renders_the_model_template(llm, hf_model):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]
    output = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    expected_prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                                    add_generation_prompt=True)
    assert output.prompt == expected_prompt
    assert output.prompt_token_ids == tokenizer.encode(expected_prompt, add_special_tokens=False)
    assert output.outputs[0].token_ids == hf_greedy(hf_model, output.prompt_token_ids, MAX_TOKENS)
    two = llm.chat([messages, [{"role": "user", "content": "Bye"}]], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in two][0] == output.outputs[0].token_ids and len(two) == 2


def test_bad_input_raises_and_the_engine_keeps_serving(llm, hf_model):
    with pytest.raises(ValueError, match="text-only"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
                 use_tqdm=False)
    with pytest.raises(ValueError, match="unknown prompt key"):
        llm.generate({"prompt": "x", "images": []}, use_tqdm=False)
    ids = [5, 6, 7]
    assert llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == \
        hf_greedy(hf_model, ids, MAX_TOKENS)


# ---- requests built on worker threads while the engine steps (engine.request_builder)

PROMPTS = ["a b c", "The quick brown fox jumps", "x", "Once upon a time there was", "1 2 3 4 5 6 7 8 9",
           "hello world", "z y", "one more prompt here"]


def build_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vlserve-build")]


def assert_engine_empty(llm) -> None:
    stats = llm.client.stats()
    assert not llm.client.has_unfinished_requests()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert build_threads() == []


@pytest.fixture
def small_steps_llm(model_dir, monkeypatch):
    """3 build threads whatever the CPU count, and an 8-token step budget: the engine steps on the
    first prompt built while the others are still building."""
    monkeypatch.setattr("engine.llm.num_build_workers", lambda num_prompts: min(num_prompts, 3))
    return LLM(model_dir, dtype="float32", max_model_len=256, num_gpu_blocks_override=64, max_num_seqs=8,
               max_num_batched_tokens=8)


def recorded_adds(llm, monkeypatch) -> list:
    added, add = [], llm.client.add_request
    monkeypatch.setattr(llm.client, "add_request", lambda request: (added.append(request), add(request)))
    return added


def test_threaded_build_keeps_input_order_ids_and_the_serial_seeds(small_steps_llm, hf_model, monkeypatch):
    llm, tokenizer = small_steps_llm, small_steps_llm.get_tokenizer()
    added = recorded_adds(llm, monkeypatch)
    serial_rng = random.Random()
    serial_rng.setstate(llm.frontend._seed_rng.getstate())   # the seeds a serial build draws, in order
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        assert output.prompt == prompt and output.prompt_token_ids == tokenizer.encode(prompt)
        assert output.outputs[0].token_ids == hf_greedy(hf_model, output.prompt_token_ids, MAX_TOKENS)
    assert [r.req_id for r in added] == [o.request_id for o in outputs]   # added in input order
    assert [int(r.req_id) for r in added] == sorted(int(r.req_id) for r in added)
    assert [r.sampling_params.seed for r in added] == [serial_rng.getrandbits(63) for _ in PROMPTS]
    assert_engine_empty(llm)


def test_a_bad_prompt_after_others_started_raises_its_error_and_frees_everything(small_steps_llm, hf_model,
                                                                                 monkeypatch):
    llm = small_steps_llm
    bad = {"prompt": "x", "images": []}
    with pytest.raises(ValueError) as alone:   # the oracle: the error it raises built alone, inline
        llm.generate(bad, GREEDY, use_tqdm=False)
    added = recorded_adds(llm, monkeypatch)
    stepped, step, build = threading.Event(), llm.client.step, llm._request_from_prompt

    def step_and_signal():
        outputs = step()
        stepped.set()
        return outputs

    def build_bad_after_a_step(prompt, *args):
        if prompt is bad:
            assert stepped.wait(timeout=30)
        return build(prompt, *args)

    monkeypatch.setattr(llm.client, "step", step_and_signal)
    monkeypatch.setattr(llm, "_request_from_prompt", build_bad_after_a_step)
    with pytest.raises(ValueError) as threaded:
        llm.generate(PROMPTS[:3] + [bad] + PROMPTS[3:], GREEDY, use_tqdm=False)
    assert type(threaded.value) is type(alone.value) and str(threaded.value) == str(alone.value)
    assert len(added) >= 1   # the engine had started on the earlier prompts
    assert_engine_empty(llm)
    ids = [5, 6, 7]   # and it keeps serving
    assert llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == \
        hf_greedy(hf_model, ids, MAX_TOKENS)


def test_an_interrupt_in_the_step_loop_aborts_all_and_joins_the_build_threads(small_steps_llm, monkeypatch):
    llm = small_steps_llm
    calls, step = [], llm.client.step

    def interrupted_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(llm.client, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS * 4, GREEDY, use_tqdm=False)
    assert_engine_empty(llm)


def test_chat_builds_on_threads_in_input_order_and_a_bad_conversation_frees_everything(small_steps_llm,
                                                                                        hf_model):
    llm, tokenizer = small_steps_llm, small_steps_llm.get_tokenizer()
    conversations = [[{"role": "user", "content": text}] for text in PROMPTS[:5]]
    outputs = llm.chat(conversations, GREEDY, use_tqdm=False)
    for conversation, output in zip(conversations, outputs, strict=True):
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert output.prompt == expected
        assert output.outputs[0].token_ids == hf_greedy(hf_model, output.prompt_token_ids, MAX_TOKENS)
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    with pytest.raises(ValueError) as alone:
        llm.chat(bad, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError) as threaded:
        llm.chat(conversations[:3] + [bad] + conversations[3:], GREEDY, use_tqdm=False)
    assert str(threaded.value) == str(alone.value) and "text-only" in str(alone.value)
    assert_engine_empty(llm)
