"""W2 decode latency: one text request, 512 output tokens (ignore_eos, greedy) at batch 1;
ms per output token = (time for 1 + 512 tokens - time for 1 token) / 512, median of runs.
Same-run baseline: transformers `generate` at the same shape (random weights, bf16, sdpa).

    python bench/w2_latency.py [--model qwen2_5_vl_3b] [--runs 5] [--enforce-eager]
Caller: by hand, bench/run_all.py (which shares one engine between workloads).
"""

from __future__ import annotations

import argparse
import time

import torch

import harness

PROMPT_TOKENS, OUTPUT_TOKENS, HF_TOKENS = 32, 512, 32


def measure_engine(llm, runs: int, output_tokens: int = OUTPUT_TOKENS) -> dict:
    from engine.sampling_params import SamplingParams

    prompt = harness.text_of_tokens(llm.get_tokenizer(), PROMPT_TOKENS, seed=2)

    def timed(max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        out = llm.generate(prompt, params, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == max_tokens
        return time.perf_counter() - start

    timed(8)  # warm-up
    first = [timed(1) for _ in range(runs)]
    full = [timed(output_tokens + 1) for _ in range(runs)]
    ms_per_token = (harness.median(full) - harness.median(first)) / output_tokens * 1e3
    return {"ms_per_token": ms_per_token, "ttft_ms": harness.median(first) * 1e3,
            "total_s_median": harness.median(full), "runs": runs, "output_tokens": output_tokens}


def measure_hf(path: str, tokenizer, runs: int = 2) -> dict:
    model = harness.hf_model(path)
    prompt = harness.text_of_tokens(tokenizer, PROMPT_TOKENS, seed=2)
    input_ids = torch.tensor([tokenizer.encode(prompt)], device="cuda")

    def timed(new_tokens: int) -> float:
        with harness.cuda_timer(times := []), torch.inference_mode():
            model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return times[0]

    timed(2)
    first = harness.median([timed(1) for _ in range(runs)])
    full = harness.median([timed(HF_TOKENS + 1) for _ in range(runs)])
    del model
    harness.free_gpu()
    return {"hf_ms_per_token": (full - first) / HF_TOKENS * 1e3, "hf_tokens": HF_TOKENS}


def report(result: dict) -> None:
    harness.print_table("W2 decode latency (batch 1)", [
        ("engine ms/token", result["ms_per_token"]), ("engine TTFT ms", result["ttft_ms"]),
        ("HF generate ms/token", result.get("hf_ms_per_token", float("nan"))),
        ("speed-up vs HF", result.get("hf_ms_per_token", float("nan")) / result["ms_per_token"]),
        ("target ms/token", 3.0), ("vLLM 0.22 ms/token", 3.91)])
    print("  json:", harness.write_json("w2_latency", result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2_5_vl_3b")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--no-deterministic", action="store_true")
    parser.add_argument("--no-hf", action="store_true")
    args = parser.parse_args()
    path = harness.model_dir(args.model)
    llm, start_s = harness.make_llm(path, max_model_len=4096, max_num_seqs=1, enforce_eager=args.enforce_eager,
                                    deterministic=not args.no_deterministic)
    result = dict(measure_engine(llm, args.runs), engine_start_s=start_s, model=args.model,
                  enforce_eager=args.enforce_eager, deterministic=not args.no_deterministic)
    tokenizer = llm.get_tokenizer()
    del llm
    harness.free_gpu()
    if not args.no_hf:
        result.update(measure_hf(path, tokenizer))
    report(result)


if __name__ == "__main__":
    main()
