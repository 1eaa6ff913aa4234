"""--generation-config / --override-generation-config (vLLM's semantics) on a copy of the tiny Qwen2
checkpoint whose generation_config.json sets temperature, top_k = 1 (so sampling is greedy),
repetition_penalty and max_new_tokens. Oracle: transformers' `generate` with that generation config
(tokens and top-5 logprobs of the raw logits, float32 CPU); a request that sets a value wins."""

import json
import shutil

import msgspec
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from app.protocol import ChatCompletionRequest, to_sampling_params
from engine import LLM, SamplingParams
from engine.config_loader import default_sampling_params

GENERATION = {"do_sample": True, "temperature": 0.7, "top_k": 1, "top_p": 0.9, "repetition_penalty": 1.8,
              "max_new_tokens": 6, "eos_token_id": 2}
PROMPT = [5, 6, 7, 217, 130, 587, 787, 496, 792]  # the tail is the greedy continuation of 5, 6, 7
NUM_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("genconfig") / "qwen2"
    shutil.copytree(tiny_model_dir("qwen2"), path)
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, **GENERATION}))
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), dtype="float32", max_model_len=128, num_gpu_blocks_override=32, max_num_seqs=4)


@torch.no_grad()
def hf_generate(model_dir, **overrides) -> tuple[list[int], list[dict[int, float]]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = GenerationConfig.from_pretrained(model_dir)
    out = model.generate(torch.tensor([PROMPT]), generation_config=config, min_new_tokens=NUM_TOKENS,
                         output_logits=True, return_dict_in_generate=True, **overrides)
    tokens = out.sequences[0, len(PROMPT):].tolist()
    tops = []
    for logits in out.logits:
        values, ids = torch.log_softmax(logits[0].float(), -1).topk(5)
        tops.append(dict(zip(ids.tolist(), values.tolist())))
    return tokens, tops


def engine_generate(llm, params: SamplingParams) -> tuple[list[int], list[dict[int, float]]]:
    completion = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0].outputs[0]
    tops = [{i: lp.logprob for i, lp in step.items() if lp.rank <= 5} for step in completion.logprobs]
    return completion.token_ids, tops


def assert_same(ours, theirs):
    assert ours[0] == theirs[0]
    for our_top, their_top in zip(ours[1], theirs[1]):
        assert sorted(our_top) == sorted(their_top)
        assert all(abs(our_top[i] - their_top[i]) < 1e-4 for i in their_top)


def test_defaults_are_read_and_offered(llm, model_dir):
    expected = {"temperature": 0.7, "top_k": 1, "top_p": 0.9, "repetition_penalty": 1.8, "max_tokens": 6}
    assert llm.config.model_config.get_diff_sampling_param() == expected
    default = llm.get_default_sampling_params()
    assert (default.temperature, default.top_k, default.repetition_penalty, default.max_tokens) == (0.7, 1, 1.8, 6)
    assert default_sampling_params(str(model_dir), "vllm", None) == {}
    assert default_sampling_params(str(model_dir), "auto", {"top_k": 3, "min_p": 0.1})["top_k"] == 3
    with pytest.raises(ValueError, match="--generation-config"):
        default_sampling_params(str(model_dir), "auto", {"temperature": -1})
    with pytest.raises(ValueError, match="--generation-config"):
        default_sampling_params(str(model_dir), str(model_dir / "missing"), None)


def test_unset_request_equals_transformers_generate_with_the_generation_config(llm, model_dir):
    theirs = hf_generate(model_dir)
    unset = engine_generate(llm, SamplingParams(max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, logprobs=5))
    assert_same(unset, theirs)
    # The penalty matters on this prompt: plain greedy decoding gives other tokens.
    plain = hf_generate(model_dir, repetition_penalty=1.0)
    assert plain[0] != theirs[0]
    # No sampling_params at all: LLM.get_default_sampling_params() (max_tokens from max_new_tokens).
    assert len(llm.generate({"prompt_token_ids": PROMPT}, use_tqdm=False)[0].outputs[0].token_ids) <= 6


def test_a_value_set_in_the_request_wins(llm, model_dir):
    params = SamplingParams(max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, logprobs=5, repetition_penalty=1.0)
    assert_same(engine_generate(llm, params), hf_generate(model_dir, repetition_penalty=1.0))


def test_vllm_generation_config_turns_the_defaults_off(model_dir):
    llm = LLM(str(model_dir), dtype="float32", max_model_len=128, num_gpu_blocks_override=32,
              generation_config="vllm", override_generation_config={"repetition_penalty": 1.0, "top_k": 1})
    assert llm.get_default_sampling_params().unset_fields == {"temperature", "top_p", "min_p"}
    params = SamplingParams(max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS, logprobs=5)
    assert_same(engine_generate(llm, params), hf_generate(model_dir, repetition_penalty=1.0))


def test_unset_is_distinguishable_from_default():
    assert SamplingParams().unset_fields == {"temperature", "top_p", "top_k", "min_p", "repetition_penalty"}
    explicit = SamplingParams(temperature=1.0, top_k=0)
    assert explicit.temperature == SamplingParams().temperature and "temperature" not in explicit.unset_fields
    assert explicit.with_defaults({"temperature": 0.1, "top_k": 1, "min_p": 0.2}).min_p == 0.2
    assert explicit.with_defaults({"temperature": 0.1, "top_k": 1}).temperature == 1.0
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(explicit), type=SamplingParams)
    assert decoded.unset_fields == explicit.unset_fields
    request = msgspec.json.decode(b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0.5}',
                                  type=ChatCompletionRequest)
    params = to_sampling_params(request, max_n=4, max_tokens=None, logprobs=None)
    assert params.unset_fields == {"temperature", "top_k", "min_p", "repetition_penalty"} and params.top_p == 0.5
