"""CPU cost of building W1's requests (no GPU, no engine steps): 256 prompts of one fresh 448x448
PIL image + about 64 text tokens -> EngineRequests through `Frontend.make_request` (tokenize,
processor resize/hash, placeholder expansion, checks) on the tiny qwen2_5_vl checkpoint, whose
tokenizer and processor config are the ones the real-shape W1 bench uses.

Times the build serially (what `LLM.generate` did before it built on worker threads) and on a
ThreadPoolExecutor of 1, 2, 4, ... threads up to the CPU count (the scaling that sizes
`engine.request_builder`), and the time from `LLM.generate` being called to the engine's first
step (before: every request built first); median of --runs runs, fresh images each run. --profile
prints the top cProfile costs of one serial build.

    python bench/request_build.py [--requests 256] [--runs 5] [--profile]
Caller: by hand (results in BENCHMARKS.md, "Building W1's requests (CPU)").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import harness  # noqa: E402

TEXT_TOKENS, OUTPUT_TOKENS, IMAGE_SIZE = 64, 128, (448, 448)


def make_llm():
    from build_tiny import build
    from engine.llm import LLM

    path = REPO / "samples" / "models" / "out" / "qwen2_5_vl"
    if not (path / "config.json").exists():
        build("qwen2_5_vl", path)
    return LLM(model=str(path), device="cpu", dtype="float32", max_model_len=4096, num_gpu_blocks_override=64)


def make_builds(llm, num_requests: int, seed: int) -> list:
    """One zero-argument callable per W1 prompt, each returning its EngineRequest."""
    from engine.frontend import MediaInput
    from engine.sampling_params import SamplingParams

    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    images = harness.fresh_images(num_requests, IMAGE_SIZE, seed)
    texts = [harness.IMAGE_PROMPT + harness.text_of_tokens(tokenizer, TEXT_TOKENS, seed * 100003 + i)
             for i in range(num_requests)]
    return [lambda i=i: llm.frontend.make_request(str(i), texts[i], [MediaInput("image", images[i])], params)
            for i in range(num_requests)]


def time_serial(builds: list) -> float:
    start = time.perf_counter()
    requests = [build() for build in builds]
    elapsed = time.perf_counter() - start
    del requests
    return elapsed


def time_threads(builds: list, num_threads: int) -> float:
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        requests = [future.result() for future in [pool.submit(build) for build in builds]]
    elapsed = time.perf_counter() - start
    del requests
    return elapsed


class _FirstStep(Exception):
    pass


def time_to_first_step(llm, num_requests: int, seed: int) -> float:
    """Seconds from LLM.generate's call to the engine's first step (then stopped: the
    interrupted run aborts what it added)."""
    from engine.sampling_params import SamplingParams

    tokenizer = llm.get_tokenizer()
    prompts = [{"prompt": harness.IMAGE_PROMPT + harness.text_of_tokens(tokenizer, TEXT_TOKENS, seed * 100003 + i),
                "multi_modal_data": {"image": image}}
               for i, image in enumerate(harness.fresh_images(num_requests, IMAGE_SIZE, seed))]
    step_times: list[float] = []

    def first_step():
        step_times.append(time.perf_counter())
        raise _FirstStep

    llm.client.step = first_step
    start = time.perf_counter()
    try:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS, ignore_eos=True),
                     use_tqdm=False)
    except _FirstStep:
        pass
    finally:
        del llm.client.step
    assert not llm.client.has_unfinished_requests()
    return step_times[0] - start


def print_profile(llm, num_requests: int) -> None:
    builds = make_builds(llm, num_requests, seed=999)
    profile = cProfile.Profile()
    profile.enable()
    time_serial(builds)
    profile.disable()
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(12)
    stats.sort_stats("cumulative").print_stats(16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    llm = make_llm()
    time_serial(make_builds(llm, 16, seed=0))   # warm-up: processor, tokenizer caches
    num_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    thread_counts = [n for n in (1, 2, 4, 8, 12, 16) if n <= num_cpus]
    rows: list[tuple[str, list[float]]] = [("serial", [])] + [(f"{n} thread(s)", []) for n in thread_counts]
    for run in range(args.runs):   # interleaved, so a neighbour's load spreads over all rows
        rows[0][1].append(time_serial(make_builds(llm, args.requests, seed=1 + run)))
        for (_, times), num_threads in zip(rows[1:], thread_counts):
            times.append(time_threads(make_builds(llm, args.requests, seed=1 + run), num_threads))
    first_step_s = statistics.median(time_to_first_step(llm, args.requests, seed=50 + run) for run in range(args.runs))
    print(f"\n== Building {args.requests} W1 requests on the CPU ({num_cpus} CPUs), median of {args.runs} runs")
    serial_s = statistics.median(rows[0][1])
    for name, times in rows:
        seconds = statistics.median(times)
        print(f"  {name:14s} {seconds:7.3f} s  {seconds / args.requests * 1e3:6.3f} ms/request  "
              f"x{serial_s / seconds:4.2f}")
    print(f"  LLM.generate: first engine step after {first_step_s:.3f} s")
    if args.profile:
        print_profile(llm, args.requests)


if __name__ == "__main__":
    main()
