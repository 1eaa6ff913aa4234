"""GPU profile of the engine core (issue 14): where a decode step's GPU time goes, where the host's
time goes, and whether Triton compiles anything after warm-up. Parts (one process each):

  linear   batch-invariant linear (split-K fixed by shape) vs the unsplit kernel vs cuBLAS, at the
           Qwen2.5-VL-3B LM shapes and M = 1, 8, 64, 256, 4096; bit invariance of rows across M
  w2       batch-1 decode: torch.profiler over 64 decode steps -> top CUDA kernels, GPU time per
           token vs wall time per token (the gap is host time the GPU waits for)
  w1       W1 (256 image requests): torch.profiler over one run -> top CUDA kernels, launches,
           GPU busy share; Triton compilations after warm-up are listed (should be none)

    python bench/profile_gpu.py --part w2 [--no-deterministic] [--unsplit]
Output: a table on stdout, JSON under bench/results/ (and $OUT when set).
Caller: by hand, bench/run_gpu.sh-style device calls.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter

import torch

import harness

LM_SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (22016, 2048), "down": (2048, 11008),
             "lm_head": (151936, 2048)}


def force_unsplit() -> None:
    """The kernel as it was before split-K (one K range per weight), for before/after numbers."""
    import triton

    from vlserve_kernels import matmul

    matmul.k_split = lambda num_cols, k: (1, triton.cdiv(k, matmul.BLOCK_K))


def count_triton_compiles() -> Counter:
    """Wrap triton's compile so every compilation is counted by kernel name."""
    import triton.compiler.compiler as compiler

    counts: Counter = Counter()
    original = compiler.compile

    def counting(src, *args, **kwargs):
        counts[getattr(getattr(src, "fn", None), "__name__", str(src)[:60])] += 1
        return original(src, *args, **kwargs)

    compiler.compile = counting
    import triton.runtime.jit as jit
    if getattr(jit, "compile", None) is original:
        jit.compile = counting
    return counts


def part_linear() -> dict:
    import triton

    import vlserve_kernels as kernels
    from vlserve_kernels import matmul

    result, gen = {}, torch.Generator(device="cuda").manual_seed(0)
    split_fn = matmul.k_split
    for name, (n, k) in LM_SHAPES.items():
        x = torch.randn(4096, k, device="cuda", generator=gen).to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(torch.bfloat16)
        entry = {"splits": split_fn(n, k)}
        alone = kernels.batch_invariant_linear(x[:1], w)
        entry["rows_invariant"] = all(torch.equal(kernels.batch_invariant_linear(x[:m], w)[:1], alone)
                                      for m in (1, 3, 17, 64, 65, 130, 256, 1000, 4096))
        ref = x[:64].double() @ w.double().T
        entry["rel_error"] = ((kernels.batch_invariant_linear(x[:64], w).double() - ref).norm() / ref.norm()).item()
        for m in (1, 8, 64, 256, 4096):
            entry[f"cublas_us_{m}"] = 1e3 * triton.testing.do_bench(lambda m=m: torch.nn.functional.linear(x[:m], w), warmup=10, rep=50, return_mode="median")
            entry[f"split_us_{m}"] = 1e3 * triton.testing.do_bench(lambda m=m: kernels.batch_invariant_linear(x[:m], w), warmup=10, rep=50, return_mode="median")
        matmul.k_split = lambda num_cols, kk: (1, triton.cdiv(kk, matmul.BLOCK_K))
        for m in (1, 8, 64, 256, 4096):
            entry[f"unsplit_us_{m}"] = 1e3 * triton.testing.do_bench(lambda m=m: kernels.batch_invariant_linear(x[:m], w), warmup=10, rep=50, return_mode="median")
        matmul.k_split = split_fn
        entry["weight_gb_per_s_m1_split"] = n * k * 2 / entry["split_us_1"] / 1e3
        result[name] = entry
        print(name, {key: (round(v, 1) if isinstance(v, float) else v) for key, v in entry.items()}, flush=True)
    return result


def kernel_table(prof, top: int = 25) -> list[tuple[str, int, float]]:
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us and event.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((event.key[:90], event.count, device_us))
    rows.sort(key=lambda r: -r[2])
    return rows[:top]


def part_w2(args) -> dict:
    from engine.sampling_params import SamplingParams

    path = harness.model_dir("qwen2_5_vl_3b")
    llm, start_s = harness.make_llm(path, max_model_len=4096, max_num_seqs=1,
                                    deterministic=not args.no_deterministic)
    compiles = count_triton_compiles()
    prompt = harness.text_of_tokens(llm.get_tokenizer(), 32, seed=2)

    def generate(tokens):
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        return time.perf_counter() - start

    generate(16)
    walls = sorted((generate(257) - generate(1)) / 256 * 1e3 for _ in range(3))
    compiles.clear()
    steps = 64
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        generate(steps + 1)
    table = kernel_table(prof)
    gpu_us = sum(e.device_time_total for e in prof.key_averages()
                 if e.device_type == torch.autograd.DeviceType.CUDA)
    if args.trace:
        prof.export_chrome_trace(os.path.join(os.environ.get("OUT", "/tmp"), f"w2_trace_{args.tag}.json"))
    result = {"engine_start_s": start_s, "ms_per_token_wall_median": walls[1], "ms_per_token_runs": walls,
              "gpu_ms_per_step_profiled": gpu_us / 1e3 / (steps + 1), "kernels": table,
              "triton_compiles_after_warmup": dict(compiles)}
    print(f"W2 [{args.tag}] wall {walls[1]:.3f} ms/token (runs {[round(w, 3) for w in walls]}), "
          f"GPU {result['gpu_ms_per_step_profiled']:.3f} ms/step, start {start_s:.1f} s", flush=True)
    for name, count, us in table:
        print(f"   {us / (steps + 1):9.1f} us/step  x{count / (steps + 1):6.1f}  {name}")
    print("   triton compiles after warm-up:", dict(compiles))
    return result


def part_w1(args) -> dict:
    import w1_throughput

    path = harness.model_dir("qwen2_5_vl_3b")
    llm, start_s = harness.make_llm(path, max_model_len=4096, deterministic=not args.no_deterministic)
    compiles = count_triton_compiles()
    w1_throughput.run_once(llm, args.requests, seed=0)
    compiles.clear()
    timed = w1_throughput.run_once(llm, args.requests, seed=1)
    print(f"W1 [{args.tag}] {timed['output_tokens'] / timed['seconds']:.0f} out tok/s ({timed['seconds']:.2f} s)", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        profiled = w1_throughput.run_once(llm, args.requests, seed=2)
    table = kernel_table(prof, 30)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_s = sum(e.device_time_total for e in events) / 1e6
    launches = sum(e.count for e in events)
    result = {"engine_start_s": start_s, "seconds": timed["seconds"], "out_tok_s": timed["output_tokens"] / timed["seconds"],
              "profiled_seconds": profiled["seconds"], "gpu_busy_s": gpu_s, "kernel_launches": launches,
              "kernels": table, "triton_compiles_after_warmup": dict(compiles)}
    print(f"   profiled run {profiled['seconds']:.2f} s, GPU kernel time {gpu_s:.2f} s, {launches} kernels")
    for name, count, us in table:
        print(f"   {us / 1e3:9.1f} ms  x{count:6d}  {name}")
    print("   triton compiles after warm-up:", dict(compiles))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("linear", "w2", "w1"), required=True)
    parser.add_argument("--no-deterministic", action="store_true")
    parser.add_argument("--unsplit", action="store_true", help="the batch-invariant linear without split-K")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args()
    args.tag = ("nondet" if args.no_deterministic else "det") + ("-unsplit" if args.unsplit else "")
    if args.unsplit:
        force_unsplit()
    result = {"linear": part_linear, "w2": lambda: part_w2(args), "w1": lambda: part_w1(args)}[args.part]()
    name = f"profile_{args.part}_{args.tag}"
    harness.write_json(name, result)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], name + ".json"), "w") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
