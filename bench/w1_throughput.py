"""W1 offline throughput, end to end from PIL images: 256 requests, each one fresh 448x448 image
+ about 64 text tokens, 128 output tokens (ignore_eos, greedy), through LLM.generate. Median of
runs after a warm-up, fresh images every run; requests/s, output tokens/s, images/s, vision vs
text prompt tokens, and (in one extra instrumented run) time per stage.
Same-run baseline: transformers `generate` at batch 64 on the same shape (random weights, bf16,
sdpa), 128 new tokens like W1 itself and like the baseline in shared/REFERENCE.md (one batch of 64
requests rather than 256, to bound its time; tokens/s is per generated token).

    python bench/w1_throughput.py [--runs 5] [--requests 256] [--enforce-eager] [--no-deterministic]
Caller: by hand, bench/run_all.py.
"""

from __future__ import annotations

import argparse
import time

import torch

import harness

TEXT_TOKENS, OUTPUT_TOKENS, IMAGE_SIZE = 64, 128, (448, 448)
HF_BATCH, HF_NEW_TOKENS = 64, OUTPUT_TOKENS


def make_prompts(tokenizer, num_requests: int, seed: int) -> list[dict]:
    images = harness.fresh_images(num_requests, IMAGE_SIZE, seed)
    return [{"prompt": harness.IMAGE_PROMPT + harness.text_of_tokens(tokenizer, TEXT_TOKENS, seed * 100003 + i),
             "multi_modal_data": {"image": image}} for i, image in enumerate(images)]


def run_once(llm, num_requests: int, seed: int) -> dict:
    from engine.sampling_params import SamplingParams

    prompts = make_prompts(llm.get_tokenizer(), num_requests, seed)   # PIL images ready, not yet processed
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    image_tokens = sum(o.num_image_tokens for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {"seconds": elapsed, "output_tokens": output_tokens, "image_tokens": image_tokens,
            "text_prompt_tokens": prompt_tokens - image_tokens, "requests": len(outputs)}


def stage_times(llm, num_requests: int, seed: int) -> dict:
    """One instrumented run: every stage synchronises, so the sum exceeds the timed runs."""
    from engine.request_builder import RequestBuilder

    timers = harness.StageTimers()
    runner = llm.client.core.runner if hasattr(llm.client, "core") else None
    # Requests are built on worker threads (engine.request_builder), overlapped with the steps: the
    # stage is the engine thread's wait for them, not the (parallel) build time.
    timers.wrap(RequestBuilder, "take_ready", "preprocess (engine thread waiting for built requests)")
    if runner is not None:
        if runner.encoder_runner is not None:
            timers.wrap(runner.encoder_runner, "_encode", "vision tower")
        timers.wrap(runner, "_forward", "LM forward",
                    classify=lambda so, batch: "decode (LM)" if batch.attn_metadata.max_query_len == 1
                    else "prefill (LM, mixed steps)")
        timers.wrap(runner, "_sample", "sample (logits + sampler)")
    start = time.perf_counter()
    try:
        run_once(llm, num_requests, seed)
    finally:
        timers.restore()
    total = time.perf_counter() - start
    stages = dict(timers.seconds)
    # The vision tower runs inside the prefill steps' forward: report prefill without it.
    mixed = "prefill (LM, mixed steps)"
    if mixed in stages:
        stages[mixed] -= stages.get("vision tower", 0.0)
    stages["other (scheduler, detokenize, python)"] = total - sum(stages.values())
    return {"instrumented_total_s": total, "stages_s": stages, "stage_calls": dict(timers.calls)}


def measure_hf(path: str, llm_tokenizer) -> dict:
    from transformers import AutoProcessor

    model = harness.hf_model(path)
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"   # decoder-only batch generation
    prompts = make_prompts(llm_tokenizer, HF_BATCH, seed=999)
    inputs = processor(text=[p["prompt"] for p in prompts], images=[p["multi_modal_data"]["image"] for p in prompts],
                       return_tensors="pt", padding=True).to("cuda")
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        times = []
        with harness.cuda_timer(times):
            model.generate(**inputs, max_new_tokens=HF_NEW_TOKENS, min_new_tokens=HF_NEW_TOKENS, do_sample=False)
    del model
    harness.free_gpu()
    return {"hf_batch": HF_BATCH, "hf_new_tokens": HF_NEW_TOKENS,
            "hf_output_tokens_per_s": HF_BATCH * HF_NEW_TOKENS / times[0]}


def measure_engine(llm, runs: int, num_requests: int) -> dict:
    run_once(llm, num_requests, seed=0)   # warm-up (compiles, autotunes)
    results = [run_once(llm, num_requests, seed=1 + i) for i in range(runs)]
    seconds = harness.median([r["seconds"] for r in results])
    last = results[-1]
    return {"runs": runs, "requests": num_requests, "median_s": seconds,
            "all_s": [round(r["seconds"], 3) for r in results],
            "requests_per_s": num_requests / seconds, "output_tokens_per_s": last["output_tokens"] / seconds,
            "images_per_s": num_requests / seconds, "image_tokens": last["image_tokens"],
            "text_prompt_tokens": last["text_prompt_tokens"], "output_tokens": last["output_tokens"],
            **stage_times(llm, num_requests, seed=10_000)}


def report(result: dict) -> None:
    rows = [("requests", result["requests"]), ("median seconds", result["median_s"]),
            ("runs (s)", result["all_s"]), ("requests/s", result["requests_per_s"]),
            ("output tokens/s", result["output_tokens_per_s"]), ("images/s", result["images_per_s"]),
            ("vision prompt tokens", result["image_tokens"]), ("text prompt tokens", result["text_prompt_tokens"]),
            ("HF generate out tok/s (batch 64)", result.get("hf_output_tokens_per_s", float("nan"))),
            ("target out tok/s", 8300.0), ("vLLM 0.22 out tok/s", 5505.0)]
    rows += [(f"stage: {k}", v) for k, v in result["stages_s"].items()]
    harness.print_table("W1 offline throughput (end to end from PIL images)", rows)
    print("  json:", harness.write_json("w1_throughput", result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2_5_vl_3b")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--no-deterministic", action="store_true")
    parser.add_argument("--no-hf", action="store_true")
    args = parser.parse_args()
    path = harness.model_dir(args.model)
    llm, start_s = harness.make_llm(path, max_model_len=4096, enforce_eager=args.enforce_eager,
                                    deterministic=not args.no_deterministic)
    result = dict(measure_engine(llm, args.runs, args.requests), engine_start_s=start_s, model=args.model,
                  enforce_eager=args.enforce_eager, deterministic=not args.no_deterministic)
    tokenizer = llm.get_tokenizer()
    del llm
    harness.free_gpu()
    if not args.no_hf:
        result.update(measure_hf(path, tokenizer))
    report(result)


if __name__ == "__main__":
    main()
