"""Shared pieces of the TP/PP tests: an engine.LLM on the CPU (gloo) and the comparison with
transformers (tests/reference.py), greedy tokens identical and top-5 logprobs within 1e-4."""

from __future__ import annotations

import contextlib

import pytest

from engine import LLM, SamplingParams

NUM_NEW_TOKENS = 6
TOP_K = 5
LOGPROB_ATOL = 1e-4
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=TOP_K)


@contextlib.contextmanager
def parallel_llm(model_dir, **kwargs):
    """An LLM whose workers are stopped on exit. Chunked prefill (16 tokens a step) by default."""
    kwargs = {"max_num_batched_tokens": 16, "enable_prefix_caching": False, "block_size": 4,
              "max_model_len": 256, **kwargs}
    llm = LLM(str(model_dir), dtype="float32", device="cpu", **kwargs)
    try:
        yield llm
    finally:
        llm.client.core.shutdown()


def assert_matches_reference(outputs, references) -> None:
    assert len(outputs) == len(references)
    for i, (output, ref) in enumerate(zip(outputs, references)):
        completion = output.outputs[0]
        assert output.prompt_token_ids == ref.prompt_token_ids, f"request {i}"
        assert completion.token_ids == ref.token_ids, f"request {i}"
        for step, (ours, theirs) in enumerate(zip(completion.logprobs, ref.top_logprobs, strict=True)):
            for token_id, value in theirs.items():
                assert token_id in ours, f"request {i} step {step}: token {token_id} not in our top-{TOP_K}"
                assert abs(ours[token_id].logprob - value) < LOGPROB_ATOL, f"request {i} step {step}"


@pytest.fixture(scope="session")
def qwen2_dir(tiny_model_dir):
    return tiny_model_dir("qwen2")
