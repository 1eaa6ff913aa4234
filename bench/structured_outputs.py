"""Structured outputs on the GPU (issue 17), 3B shape with dummy weights; prints a table:

  1. W1 with every request carrying its own ~10-field JSON schema (fresh schemas every run, so
     every compile is paid) against unconstrained W1: output tokens/s (target >= 0.9x).
  2. Bitmask work at batch 256: building the rows on the CPU (matchers fill) and masking the
     logits on the GPU, against the decode step time (target <= 5%).
  3. TTFT of one short request: unconstrained, a new schema (target +50 ms at p50), the same
     schema again (cached: target +1 ms).

    python bench/structured_outputs.py [--requests 256] [--runs 2] [--backend auto]
Caller: by hand, bench/run_gpu.sh.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import harness

TEXT_TOKENS, OUTPUT_TOKENS, IMAGE_SIZE = 64, 128, (448, 448)
FIELD_TYPES = [{"type": "integer", "minimum": 0, "maximum": 1000}, {"type": "boolean"}, {"type": "string", "maxLength": 12},
               {"enum": ["low", "mid", "high"]}, {"type": "number"}, {"type": "array", "items": {"type": "integer"}, "maxItems": 3}]


def make_schema(seed: int, num_fields: int = 10) -> dict:
    """A ~10-field object schema, different for every seed (field names and types)."""
    rng = random.Random(seed)
    names = [f"{rng.choice(harness.WORDS)}_{seed}_{i}" for i in range(num_fields)]
    return {"type": "object", "properties": {n: rng.choice(FIELD_TYPES) for n in names}, "required": names,
            "additionalProperties": False}


def w1_run(llm, num_requests: int, seed: int, constrained: bool) -> dict:
    from engine import SamplingParams, StructuredOutputsParams

    tokenizer = llm.get_tokenizer()
    images = harness.fresh_images(num_requests, IMAGE_SIZE, seed)
    prompts = [{"prompt": harness.IMAGE_PROMPT + harness.text_of_tokens(tokenizer, TEXT_TOKENS, seed * 100003 + i),
                "multi_modal_data": {"image": image}} for i, image in enumerate(images)]
    params = [SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS, ignore_eos=not constrained,
                             structured_outputs=StructuredOutputsParams(json=make_schema(seed * 1000 + i))
                             if constrained else None) for i in range(num_requests)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}


def w1(llm, num_requests: int, runs: int) -> dict:
    result = {}
    for constrained in (False, True):
        w1_run(llm, num_requests, seed=7 + constrained, constrained=constrained)   # warm-up
        measured = [w1_run(llm, num_requests, seed=100 * (i + 1) + constrained, constrained=constrained)
                    for i in range(runs)]
        tokens_per_s = harness.median([m["output_tokens"] / m["seconds"] for m in measured])
        result["json_schema" if constrained else "unconstrained"] = tokens_per_s
    result["ratio"] = result["json_schema"] / result["unconstrained"]
    return result


def bitmask_share(llm, num_requests: int) -> dict:
    """An instrumented constrained W1 run: per-step time of the bitmask build (CPU) and of core.step;
    the GPU masking measured alone at batch num_requests over the model's vocabulary."""
    from engine.sampler import apply_grammar_bitmask

    core = llm.client.core
    timers = harness.StageTimers()
    timers.wrap(core.scheduler.structured_output, "grammar_bitmask", "bitmask build (CPU)")
    timers.wrap(core, "step", "engine step")
    try:
        w1_run(llm, num_requests, seed=4242, constrained=True)
    finally:
        timers.restore()
    vocab = core.scheduler.structured_output.vocab_size
    logits = torch.randn(num_requests, vocab, device="cuda")
    bitmask = torch.randint(-2 ** 31, 2 ** 31 - 1, (num_requests, (vocab + 31) // 32), dtype=torch.int32)
    rows = torch.arange(num_requests, device="cuda")
    times = []
    for _ in range(20):
        with harness.cuda_timer(times):
            apply_grammar_bitmask(logits, rows, bitmask.to("cuda", non_blocking=True))
    build = timers.seconds["bitmask build (CPU)"] / max(1, timers.calls["bitmask build (CPU)"])
    step = timers.seconds["engine step"] / max(1, timers.calls["engine step"])
    apply = harness.median(times[5:])
    return {"bitmask_build_ms": 1e3 * build, "bitmask_apply_ms": 1e3 * apply, "step_ms": 1e3 * step,
            "share": (build + apply) / step}


def ttft(llm, trials: int) -> dict:
    from engine import SamplingParams, StructuredOutputsParams

    prompt = "<|im_start|>user\nFill in the record.<|im_end|>\n<|im_start|>assistant\n"

    def first_token_s(structured) -> float:
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, structured_outputs=structured), use_tqdm=False)
        return time.perf_counter() - start

    base = harness.median([first_token_s(None) for _ in range(trials)])
    new = harness.median([first_token_s(StructuredOutputsParams(json=make_schema(90_000 + i))) for i in range(trials)])
    cached_schema = StructuredOutputsParams(json=make_schema(90_000))
    cached = harness.median([first_token_s(cached_schema) for _ in range(trials)])
    return {"ttft_unconstrained_ms": 1e3 * base, "ttft_new_schema_extra_ms": 1e3 * (new - base),
            "ttft_cached_schema_extra_ms": 1e3 * (cached - base)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2_5_vl_3b")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    llm, _ = harness.make_llm(harness.model_dir(args.model), max_model_len=4096,
                              structured_outputs_config={"backend": args.backend})
    result = {"backend": args.backend, "requests": args.requests, **w1(llm, args.requests, args.runs),
              **bitmask_share(llm, args.requests), **ttft(llm, args.trials)}
    rows = [("W1 unconstrained out tok/s", result["unconstrained"]), ("W1 own JSON schema out tok/s", result["json_schema"]),
            ("ratio (target >= 0.90)", result["ratio"]), ("bitmask build per step, CPU (ms)", result["bitmask_build_ms"]),
            (f"bitmask apply at batch {args.requests}, GPU (ms)", result["bitmask_apply_ms"]),
            ("engine step, constrained run (ms)", result["step_ms"]), ("bitmask share (target <= 0.05)", result["share"]),
            ("TTFT unconstrained (ms)", result["ttft_unconstrained_ms"]),
            ("TTFT extra, new schema (target <= 50 ms)", result["ttft_new_schema_extra_ms"]),
            ("TTFT extra, cached schema (target <= 1 ms)", result["ttft_cached_schema_extra_ms"])]
    harness.print_table(f"Structured outputs ({args.backend}), {args.model} dummy weights", rows)
    print("  json:", harness.write_json("structured_outputs", result))


if __name__ == "__main__":
    main()
