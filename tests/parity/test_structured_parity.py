"""Issue 17 acceptance (parity): structured outputs against transformers `generate` with the same
grammar library driving a logits processor, float32 on the CPU.

The oracle for xgrammar is `xgrammar.contrib.hf.LogitsProcessor`; for llguidance a small processor
here (a fresh LLMatcher, the same bitmask format). Both are compiled here straight from the
libraries, not through engine.structured_output. For the 38 constraints of structured_specs.py, each under both
backends, in one batch with unconstrained requests: greedy tokens identical and top-5 logprobs of the
unmasked distribution within 1e-4; under defaults, chunked prefill and preemption (tiny Qwen2) and
with an image (tiny Qwen2.5-VL). Every run ends with all KV blocks free.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine import LLM, SamplingParams, StructuredOutputsParams
from reference import RefRequest, load, prepare_inputs
from tests.engine.structured_output.structured_specs import all_constraints

MAX_NEW_TOKENS = 12
TOP_K = 5
BACKENDS = ("guidance", "xgrammar")
TEXTS = ["Serving engines batch many requests together, schedule prefill and decode, and stream tokens back. "
         "Reply in the requested format please.",
         "The quick brown fox jumps over the lazy dog. A picture shows a red square on a blue background. Answer:",
         "Once upon a time there was a small robot who loved to paint colourful pictures of mountains. Output:"]
IMG = "<|vision_start|><|image_pad|><|vision_end|>"


def chat(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def pattern_image() -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 255, (84, 112, 3), dtype=np.uint8))


# ---------------------------------------------------------------- the oracle: HF generate + the library


class GuidanceLogitsProcessor:
    """llguidance driving transformers: consume the last sampled token, mask the next step."""

    def __init__(self, matcher):
        self.matcher, self.started = matcher, False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        import llguidance.torch
        import xgrammar as xgr

        if self.started:
            assert self.matcher.consume_token(int(input_ids[0, -1])), self.matcher.get_error()
        self.started = True
        bitmask = llguidance.torch.allocate_token_bitmask(1, scores.shape[-1])
        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, 0)
        xgr.apply_token_bitmask_inplace(scores, bitmask)
        return scores


@functools.lru_cache(maxsize=4)
def xgrammar_compiler(model_dir: str, vocab_size: int):
    import xgrammar as xgr

    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(load(model_dir).tokenizer, vocab_size=vocab_size))


@functools.lru_cache(maxsize=4)
def guidance_tokenizer(model_dir: str, vocab_size: int):
    import llguidance.hf

    return llguidance.hf.from_tokenizer(load(model_dir).tokenizer, n_vocab=vocab_size)


def library_processor(backend: str, model_dir: str, vocab_size: int, field: str, value):
    if backend == "xgrammar":
        from xgrammar.contrib.hf import LogitsProcessor

        compiler = xgrammar_compiler(model_dir, vocab_size)
        compiled = {"json": lambda: compiler.compile_json_schema(json.dumps(value), any_whitespace=True),
                    "regex": lambda: compiler.compile_regex(value),
                    "choice": lambda: compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in value)),
                    "grammar": lambda: compiler.compile_grammar(value)}[field]()
        return LogitsProcessor(compiled)
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    grammar = {"json": lambda: LLMatcher.grammar_from_json_schema(json.dumps(value), defaults={"whitespace_flexible": True}),
               "regex": lambda: LLMatcher.grammar_from_regex(value),
               "choice": lambda: LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value)),
               "grammar": lambda: LLMatcher.grammar_from_lark(any_to_lark(value))}[field]()
    return GuidanceLogitsProcessor(LLMatcher(guidance_tokenizer(model_dir, vocab_size), grammar))


class RecordUnmasked:
    """Keeps a copy of each step's logits before the grammar processor masks them (in place)."""

    def __init__(self, processor):
        self.processor, self.logits = processor, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.logits.append(scores[0].clone())
        return self.processor(input_ids, scores) if self.processor else scores


@torch.inference_mode()
def hf_constrained(model_dir: str, request, processor) -> tuple[list[int], list[dict[int, float]]]:
    loaded = load(model_dir)
    inputs = prepare_inputs(model_dir, request)
    recorder = RecordUnmasked(processor)
    out = loaded.model.generate(
        **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1, return_dict_in_generate=True,
        pad_token_id=loaded.tokenizer.pad_token_id, eos_token_id=list(loaded.eos_token_ids),
        logits_processor=[recorder], temperature=None, top_k=None, top_p=None)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    tops = []
    for logits in recorder.logits[:len(tokens)]:
        values, ids = torch.topk(torch.log_softmax(logits.float(), dim=-1), TOP_K)
        tops.append(dict(zip(ids.tolist(), values.tolist())))
    return tokens, tops


# ---------------------------------------------------------------- cases


def make_cases(model_dir: str, with_image: bool):
    """[(engine prompt, HF request, SamplingParams, HF logits processor or None)]: each constraint under
    each backend, plus 3 unconstrained requests."""
    loaded = load(model_dir)
    vocab_size = loaded.model.config.get_text_config().vocab_size
    image = pattern_image()
    cases = []
    constraints = [(b, f, v) for f, v in all_constraints() for b in BACKENDS] + [(None, None, None)] * 3
    for i, (backend, field, value) in enumerate(constraints):
        text = TEXTS[i % len(TEXTS)]
        if with_image:
            prompt = chat(IMG + text)
            engine_prompt = {"prompt": prompt, "multi_modal_data": {"image": image}}
            hf_request = RefRequest(prompt=prompt, images=(image,))
        else:
            engine_prompt = hf_request = chat(text)
        structured = None if field is None else StructuredOutputsParams(**{field: value}, backend=backend)
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, logprobs=TOP_K, structured_outputs=structured)
        processor = None if field is None else library_processor(backend, model_dir, vocab_size, field, value)
        cases.append((engine_prompt, hf_request, params, processor))
    return cases


@pytest.fixture(scope="module")
def cases_of(tiny_model_dir):
    """model name -> (model_dir, cases, HF references), built once per model."""
    built = {}

    def get(name: str):
        if name not in built:
            model_dir = str(tiny_model_dir(name))
            cases = make_cases(model_dir, with_image=name == "qwen2_5_vl")
            reference = [hf_constrained(model_dir, hf_request, processor) for _, hf_request, _, processor in cases]
            built[name] = model_dir, cases, reference
        return built[name]

    return get


def run_and_compare(llm: LLM, cases, reference) -> None:
    """The cases in one batch (any subset: each case's reference is its own)."""
    outputs = llm.generate([c[0] for c in cases], [c[2] for c in cases], use_tqdm=False)
    for i, (output, (tokens, tops)) in enumerate(zip(outputs, reference)):
        completion = output.outputs[0]
        what = f"case {i}: {cases[i][2].structured_outputs}"
        assert completion.token_ids == tokens, what
        for step, (entry, expected) in enumerate(zip(completion.logprobs, tops)):
            ranked = [token_id for _, token_id in sorted((lp.rank, t) for t, lp in entry.items())][:TOP_K]
            assert ranked == list(expected), f"{what} step {step}"
            assert max(abs(entry[t].logprob - v) for t, v in expected.items()) < 1e-4, f"{what} step {step}"
    stats = llm.client.stats()
    assert stats.num_running_reqs == stats.num_waiting_reqs == 0
    assert stats.num_free_blocks == stats.num_total_blocks > 0


# Preemption runs on the text model; the VL model runs defaults and chunked prefill (time). Async
# scheduling (grammar bitmasks built after the step in flight returns, while the next forward runs):
# with chunked prefill, and with preemption while a step is in flight.
SETTINGS = {"defaults": {}, "chunked_prefill": {"max_num_batched_tokens": 32},
            "preemption": {"num_gpu_blocks_override": 40, "enable_prefix_caching": False},
            "async_chunked": {"async_scheduling": True, "max_num_batched_tokens": 32},
            "async_preemption": {"async_scheduling": True, "num_gpu_blocks_override": 40,
                                 "enable_prefix_caching": False}}


@pytest.mark.slow
@pytest.mark.parametrize("name, setting", [("qwen2", "defaults"), ("qwen2", "chunked_prefill"), ("qwen2", "preemption"),
                                           ("qwen2", "async_chunked"), ("qwen2", "async_preemption"),
                                           ("qwen2_5_vl", "defaults"), ("qwen2_5_vl", "chunked_prefill"),
                                           ("qwen2_5_vl", "async_chunked")])
def test_structured_outputs_match_transformers(cases_of, name, setting):
    model_dir, cases, reference = cases_of(name)
    llm = LLM(model_dir, dtype="float32", max_model_len=512, device="cpu", **SETTINGS[setting])
    assert llm.client.core.async_scheduling == setting.startswith("async")
    if setting != "defaults":   # every third constraint (both backends) and the unconstrained requests, for time
        keep = [i for i in range(len(cases)) if (i // len(BACKENDS)) % 3 == 0 or cases[i][2].structured_outputs is None]
        cases, reference = [cases[i] for i in keep], [reference[i] for i in keep]
    run_and_compare(llm, cases, reference)
    if setting.endswith("preemption"):
        assert llm.client.stats().num_preemptions > 0
    # Many cases end where the grammar allows EOS, the rest are cut by max_tokens: both paths are compared.
    num_stopped = sum(1 for tokens, _ in reference if tokens and tokens[-1] in load(model_dir).eos_token_ids)
    assert 5 < num_stopped < len(reference) - 5
