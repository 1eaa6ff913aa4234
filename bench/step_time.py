"""GPU time of one captured decode step: the engine's CUDA graph for a batch bucket replayed back to
back, timed by CUDA events (median of blocks of replays). Precise to a fraction of a percent where
W2's wall clock (bench/w2_latency.py) spreads by a few percent between engine starts, so kernel A/Bs
use this. Also prints W2's wall (ms per token over 256 tokens, one run) for reference.

    python bench/step_time.py [--buckets 1,64] [--replays 200] [--tokens 300] [--no-deterministic]
Caller: by hand, bench/gpu_fusion_call.sh. Replaying re-runs the bucket's last step: it rewrites
that step's KV slots with the same values and changes nothing else the engine reads.
"""

from __future__ import annotations

import argparse
import time

import torch

import harness


def capture_registry() -> list:
    """DecodeGraphs instances as the engine captures them (the in-process engine of LLM)."""
    from engine.runner import cuda_graphs

    captured: list = []
    original = cuda_graphs.DecodeGraphs.capture

    def capture(self):
        captured.append(self)
        return original(self)
    cuda_graphs.DecodeGraphs.capture = capture
    return captured


def replay_us(graph, replays: int, blocks: int = 5) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(blocks):
        graph.replay()
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / replays)
    return harness.median(times)


def main() -> None:
    from engine.sampling_params import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buckets", default="1,64")
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--no-deterministic", action="store_true")
    parser.add_argument("--tokens", type=int, default=300,
                        help="tokens decoded before a bucket's replays (its context: 32 + this)")
    args = parser.parse_args()
    captured = capture_registry()
    path = harness.model_dir("qwen2_5_vl_3b")
    llm, start_s = harness.make_llm(path, max_model_len=4096, max_num_seqs=64,
                                    deterministic=not args.no_deterministic)
    graphs = captured[-1]
    prompt = harness.text_of_tokens(llm.get_tokenizer(), 32, seed=2)

    def generate(num_prompts: int, tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        begin = time.perf_counter()
        llm.generate([prompt] * num_prompts, params, use_tqdm=False)
        return time.perf_counter() - begin

    generate(1, 16)
    wall = (generate(1, 257) - generate(1, 1)) / 256 * 1e3
    print(f"engine start {start_s:.1f} s; W2 wall {wall:.3f} ms/token (one run)")
    for bucket in (int(b) for b in args.buckets.split(",")):
        generate(bucket, args.tokens)   # the bucket's static inputs: `bucket` rows at 32 + tokens of context
        us = replay_us(graphs.graphs[bucket], args.replays)
        print(f"decode step, bucket {bucket}: {us:.1f} us GPU per replay", flush=True)


if __name__ == "__main__":
    main()
