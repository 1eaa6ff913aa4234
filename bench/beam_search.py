"""Beam search on the GPU (issue 18), Qwen2.5-VL-3B shape, dummy weights, bf16:
  latency:    one request, 64-token prompt, 256 new tokens (ignore_eos), width 4 vs greedy of the
              same request; target: beam wall time <= 1.5x greedy.
  throughput: 100 prompts of 256 tokens, 256 new tokens each, width 4 (LLM.beam_search); our
              prompts/s and beam tokens/s (100 x 4 x 256 / s). vLLM 0.22's LLM.beam_search on the
              same workload is measured on its side (target: ours >= 2x).
Median of --runs after a warm-up. Runs in about a minute on an H100/H200.

    python bench/beam_search.py [--runs 3] [--prompts 100] [--width 4]
Caller: by hand (the lead, on the GPU).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import harness

PROMPT_LEN_LATENCY, PROMPT_LEN_THROUGHPUT, NEW_TOKENS = 64, 256, 256


def random_prompts(llm, count: int, length: int, seed: int) -> list[dict]:
    rng, vocab = random.Random(seed), len(llm.get_tokenizer())
    low, high = min(1000, vocab // 4), max(vocab - 1000, vocab // 2)   # plain tokens, clear of the specials
    return [{"prompt_token_ids": [rng.randrange(low, high) for _ in range(length)]} for _ in range(count)]


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_latency(llm, width: int, runs: int) -> dict:
    from engine import BeamSearchParams, SamplingParams

    prompt = random_prompts(llm, 1, PROMPT_LEN_LATENCY, seed=1)
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    beams = BeamSearchParams(beam_width=width, max_tokens=NEW_TOKENS, ignore_eos=True)
    run_greedy = lambda: llm.generate(prompt, greedy, use_tqdm=False)   # noqa: E731
    run_beams = lambda: llm.beam_search(prompt, beams)                  # noqa: E731
    run_greedy(), run_beams()   # warm-up
    greedy_s = harness.median([timed(run_greedy) for _ in range(runs)])
    beam_s = harness.median([timed(run_beams) for _ in range(runs)])
    return {"latency_greedy_s": greedy_s, "latency_beam_s": beam_s, "latency_ratio": beam_s / greedy_s}


def measure_throughput(llm, width: int, num_prompts: int, runs: int) -> dict:
    from engine import BeamSearchParams

    params = BeamSearchParams(beam_width=width, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.beam_search(random_prompts(llm, 8, PROMPT_LEN_THROUGHPUT, seed=2), params)   # warm-up
    seconds = []
    for run in range(runs):
        prompts = random_prompts(llm, num_prompts, PROMPT_LEN_THROUGHPUT, seed=10 + run)
        seconds.append(timed(lambda: llm.beam_search(prompts, params)))
    median = harness.median(seconds)
    return {"throughput_s": median, "throughput_all_s": [round(s, 3) for s in seconds],
            "prompts_per_s": num_prompts / median,
            "beam_tokens_per_s": num_prompts * width * NEW_TOKENS / median,
            "preemptions": llm.client.stats().num_preemptions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2_5_vl_3b")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--width", type=int, default=4)
    args = parser.parse_args()
    llm, start_s = harness.make_llm(harness.model_dir(args.model), max_model_len=1024)
    result = dict(model=args.model, width=args.width, engine_start_s=start_s,
                  **measure_latency(llm, args.width, args.runs),
                  **measure_throughput(llm, args.width, args.prompts, args.runs))
    harness.print_table("beam search (3B shape, bf16, dummy weights)", [
        (f"1 request, {PROMPT_LEN_LATENCY} in / {NEW_TOKENS} out: greedy s", result["latency_greedy_s"]),
        (f"  width {args.width} s", result["latency_beam_s"]),
        ("  beam / greedy (target <= 1.5)", result["latency_ratio"]),
        (f"{args.prompts} prompts, {PROMPT_LEN_THROUGHPUT} in / {NEW_TOKENS} out, width {args.width}: s",
         result["throughput_s"]),
        ("  prompts/s", result["prompts_per_s"]),
        ("  beam tokens/s", result["beam_tokens_per_s"]),
        ("  preemptions (cumulative)", result["preemptions"]),
    ])
    print("  json:", harness.write_json("beam_search", result))


if __name__ == "__main__":
    main()
