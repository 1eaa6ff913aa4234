"""Issue 17 acceptance (validity): 500 sampled generations (temperature 1.0, tiny Qwen2, one batch)
over the 20 schemas, 10 regexes and 5 choice lists of structured_specs.py, backend auto. Oracles independent of
the engine: every output that finishes with `stop` parses with strict json.loads and validates with
jsonschema, passes re.fullmatch, or is one of the choices; every output cut by `length` is a valid
prefix (the `regex` module's partial match; a choice's prefix; for JSON, a fresh llguidance matcher
consumes its tokens)."""

from __future__ import annotations

import json
import re
from collections import Counter

import jsonschema
import llguidance
import llguidance.hf
import pytest
import regex
from transformers import AutoTokenizer

from engine import LLM, SamplingParams, StructuredOutputsParams
from tests.engine.structured_output.structured_specs import CHOICES, REGEXES, SCHEMAS

NUM_SAMPLES = 500
MAX_TOKENS = 24


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return str(tiny_model_dir("qwen2"))


def test_500_sampled_outputs_are_valid(model_dir):
    constraints = [("json", s) for s in SCHEMAS] + [("regex", r) for r in REGEXES] + [("choice", c) for c in CHOICES]
    picked = [constraints[i % len(constraints)] for i in range(NUM_SAMPLES)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS, structured_outputs=StructuredOutputsParams(
        **{field: value}, disable_any_whitespace=True)) for i, (field, value) in enumerate(picked)]
    llm = LLM(model_dir, dtype="float32", device="cpu", max_model_len=256, max_num_seqs=NUM_SAMPLES)
    outputs = llm.generate(["<|im_start|>user\nAnswer.<|im_end|>\n<|im_start|>assistant\n"] * NUM_SAMPLES, params,
                           use_tqdm=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=llm.frontend.vocab_size)
    reasons = Counter()
    for (field, value), output in zip(picked, outputs):
        completion = output.outputs[0]
        text, reason = completion.text, completion.finish_reason
        reasons[field, reason] += 1
        assert reason in ("stop", "length"), (value, text)
        if field == "json" and reason == "stop":
            jsonschema.validate(strict_json(text), value)
        elif field == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(value, defaults={"whitespace_flexible": False})
            matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
            assert matcher.consume_tokens(completion.token_ids), (value, text, matcher.get_error())
        elif field == "regex":
            assert (re.fullmatch(value, text) if reason == "stop" else regex.fullmatch(value, text, partial=True)), (value, text)
        else:
            assert text in value if reason == "stop" else any(choice.startswith(text) for choice in value), (value, text)
    # Enough of each kind finished for the stop checks to mean something.
    assert reasons["json", "stop"] >= 50 and reasons["regex", "stop"] >= 50 and reasons["choice", "stop"] >= 50, reasons
    stats = llm.client.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_n_samples_each_follow_the_grammar(model_dir):
    llm = LLM(model_dir, dtype="float32", device="cpu", max_model_len=256)
    choices = ["north", "south", "east", "west"]
    params = SamplingParams(n=6, temperature=1.0, seed=7, max_tokens=8,
                            structured_outputs=StructuredOutputsParams(choice=choices))
    [output] = llm.generate(["<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n"], params, use_tqdm=False)
    texts = [completion.text for completion in output.outputs]
    assert len(texts) == 6 and all(text in choices for text in texts), texts
    assert all(completion.finish_reason == "stop" for completion in output.outputs)
