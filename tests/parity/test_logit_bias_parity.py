"""logit_bias (OpenAI), allowed_token_ids and truncate_prompt_tokens (vLLM) against transformers, float32
on the CPU: greedy tokens equal generate() with `sequence_bias` (one-token sequences: a logit bias), with
`prefix_allowed_tokens_fn`, and on the prompt's last tokens, for restricted requests batched with
unrestricted ones (which keep their own tokens), under chunked prefill too."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import SamplingParams
from test_text_parity import make_llm, model_dir, prompts

__all__ = ["model_dir", "prompts"]   # fixtures shared with test_text_parity

NEW_TOKENS = 8
ALLOWED = list(range(40, 140, 3))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], **kwargs) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, **kwargs)
    return out[0, len(prompt):].tolist()


def biases_for(model, prompt: list[int]) -> dict[int, float]:
    """A bias that changes the greedy path without forcing it: the plain first choice down by 3, the
    next two up by 1.5 and 0.5."""
    plain = hf_greedy(model, prompt)
    return {plain[0]: -3.0, plain[1]: 1.5, (plain[2] + 17) % 1000: 0.5}


@pytest.mark.parametrize("chunk", [None, 16])
def test_logit_bias_and_allowed_tokens_match_transformers(model_dir, prompts, hf_model, chunk):
    chosen = prompts[:6]
    bias = {i: biases_for(hf_model, chosen[i]) for i in (0, 3)}
    params = [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True) for _ in chosen]
    for i in bias:
        params[i] = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logit_bias=bias[i])
    params[4] = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, allowed_token_ids=ALLOWED)
    llm = make_llm(model_dir, **({"max_num_batched_tokens": chunk} if chunk else {}))
    outputs = llm.generate([{"prompt_token_ids": p} for p in chosen], params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outputs]
    for i in bias:
        expected = hf_greedy(hf_model, chosen[i], sequence_bias={(t,): b for t, b in bias[i].items()})
        assert got[i] == expected, i
        assert got[i] != hf_greedy(hf_model, chosen[i])   # the bias mattered
    assert got[4] == hf_greedy(hf_model, chosen[4], prefix_allowed_tokens_fn=lambda batch, ids: ALLOWED)
    assert set(got[4]) <= set(ALLOWED)
    for i in (1, 2, 5):
        assert got[i] == hf_greedy(hf_model, chosen[i]), i


def test_out_of_vocabulary_ids_are_refused(model_dir):
    llm = make_llm(model_dir)
    vocab = llm.get_tokenizer().vocab_size + 10_000
    for params in (SamplingParams(logit_bias={vocab: 1.0}), SamplingParams(allowed_token_ids=[vocab]),
                   SamplingParams(allowed_token_ids=[])):
        with pytest.raises(ValueError, match="logit_bias|allowed_token_ids"):
            llm.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False)


@pytest.mark.parametrize("keep", [5, 64])
def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(model_dir, prompts, hf_model, keep):
    """vLLM's truncate_prompt_tokens: the request runs on its prompt's last `keep` tokens, as transformers
    does on those tokens (a shorter prompt is kept whole)."""
    llm = make_llm(model_dir)
    chosen = [p for p in prompts if len(p) > keep][:2] + [prompts[0]]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, truncate_prompt_tokens=keep)
    outputs = llm.generate([{"prompt_token_ids": p} for p in chosen], params, use_tqdm=False)
    for prompt, output in zip(chosen, outputs):
        assert output.prompt_token_ids == prompt[-keep:]
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt[-keep:])
