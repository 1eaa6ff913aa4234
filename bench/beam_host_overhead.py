"""Host (CPU, Python) cost per decode step of one beam-search group (width 4) against one greedy
request, with no GPU and no model math: the issue 18 latency shape (64-token prompt, 256 new
tokens, ignore_eos) through LLM.generate / LLM.beam_search on the tiny qwen2_5_vl checkpoint.

Everything is the real engine path except the model forward (as bench/host_overhead.py):
`ModelRunner._forward` returns rows of a fixed random hidden-state table picked by each row's
input token, so beams that differ in their last token get different candidates and the search
forks, prunes and copies KV blocks as it would on a real model. The KV cache is reallocated at the
Qwen2.5-VL-3B shape (36 layers, 2 KV heads of 128) so that the per-layer work of the beam KV
copies is that of the real model. Beam groups step synchronously (the scheduler refuses to
schedule ahead of them), so on the GPU every microsecond here adds to the step's wall time.

Reported per decode step (median of --runs runs after a warm-up): each stage's CPU time on the
engine's thread (so that other processes on the box do not count), and
the number of aten ops the step dispatches outside the forward (on the GPU each is a kernel launch
or a transfer, about 5-10 us of host time).

    python bench/beam_host_overhead.py [--runs 3] [--width 4] [--profile out.prof]
Caller: by hand (results in BENCHMARKS.md, "Beam search host overhead per step").
"""

from __future__ import annotations

import argparse
import cProfile
import random
import statistics
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "samples" / "models"))

import host_overhead  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 64, 256
KV_SHAPE_3B = dict(num_layers=36, num_kv_heads=2, head_dim=128)   # Qwen2.5-VL-3B's language model


class ThreadTimers(host_overhead.HostTimers):
    """HostTimers on this thread's CPU time (time.thread_time): other processes sharing the cores
    do not inflate the stages (torch runs on this thread: set_num_threads(1))."""

    def wrap(self, obj, method: str, stage: str) -> None:
        original = getattr(obj, method)

        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] += time.thread_time() - start

        self.seconds[stage] += 0.0   # report in wrapping order
        self._undo.append((obj, method, original, method in vars(obj)))
        setattr(obj, method, timed)


def token_keyed_forward(runner, hidden_size: int, num_rows: int = 4096):
    """Stand-in for tower + LM: hidden row = a fixed random row picked by the input token."""
    table = torch.randn(num_rows, hidden_size, generator=torch.Generator().manual_seed(0))  # [rows, H]

    def forward(scheduler_output, batch):
        return table[(batch.input_ids * 7919) % num_rows], {}                              # [T, H]

    runner._forward = forward


def use_3b_kv_shape(runner, num_blocks: int) -> None:
    from engine.runner.memory_plan import KVCacheShape

    shape = KVCacheShape(block_size=runner.config.cache_config.block_size,
                         dtype=runner.config.model_config.dtype, **KV_SHAPE_3B)
    runner.kv_cache_shape = lambda: shape
    runner.initialize_kv_cache(num_blocks)


def make_llm(num_blocks: int = 256):
    from build_tiny import build
    from engine.llm import LLM

    path = REPO / "samples" / "models" / "out" / "qwen2_5_vl"
    if not (path / "config.json").exists():
        build("qwen2_5_vl", path)
    llm = LLM(model=str(path), device="cpu", dtype="float32", max_model_len=1024,
              num_gpu_blocks_override=num_blocks)
    runner = llm.client.core.runner
    token_keyed_forward(runner, runner.text_config.hidden_size)
    use_3b_kv_shape(runner, num_blocks)
    return llm


def instrument(llm) -> ThreadTimers:
    import engine.beam_groups as beam_groups
    from engine.detokenizer import OutputProcessor
    from engine.runner.step_output import StepOutput

    timers, core = ThreadTimers(), llm.client.core
    runner, scheduler = core.runner, core.scheduler
    timers.wrap(core, "step", "engine step (total)")
    timers.wrap(scheduler, "schedule", "  scheduler.schedule")
    timers.wrap(runner, "execute", "  runner.execute")
    timers.wrap(runner.input_batch, "update", "    input_batch.update (forks)")
    timers.wrap(runner, "_copy_kv_blocks", "    _copy_kv_blocks")
    timers.wrap(runner.input_batch, "prepare", "    input_batch.prepare")
    timers.wrap(runner, "_sample", "    _sample (tiny lm_head + sampler)")
    timers.wrap(StepOutput, "result", "    StepOutput.result (logprobs to lists)")
    timers.wrap(scheduler, "update_from_output", "  scheduler.update_from_output")
    timers.wrap(beam_groups, "advance_beam_groups", "    advance_beam_groups")
    timers.wrap(llm.client.core.scheduler.kv_cache_manager, "reassign_beams", "      reassign_beams")
    timers.wrap(OutputProcessor, "process", "output processing (detokenize)")
    return timers


class OpCounter(TorchDispatchMode):
    """Counts aten ops (on the GPU: kernel launches and copies) by name."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def prompt(llm, seed: int) -> list[dict]:
    rng, vocab = random.Random(seed), llm.client.core.runner.text_config.vocab_size
    return [{"prompt_token_ids": [rng.randrange(100, vocab - 100) for _ in range(PROMPT_LEN)]}]


def generate(llm, width: int, seed: int):
    """width 1: greedy LLM.generate; else LLM.beam_search. -> the token ids (for the same-output check)."""
    from engine import BeamSearchParams, SamplingParams

    if width == 1:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        return [o.outputs[0].token_ids for o in llm.generate(prompt(llm, seed), params, use_tqdm=False)]
    beams = BeamSearchParams(beam_width=width, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [s.tokens for o in llm.beam_search(prompt(llm, seed), beams) for s in o.sequences]


def run_once(llm, width: int, seed: int, profile: cProfile.Profile | None = None) -> dict:
    timers, steps, step = instrument(llm), [0], llm.client.step

    def counted_step():
        steps[0] += 1
        return step()

    llm.client.step = counted_step
    start = time.perf_counter()
    if profile is not None:
        profile.enable()
    tokens = generate(llm, width, seed)
    if profile is not None:
        profile.disable()
    total = time.perf_counter() - start
    timers.restore()
    llm.client.__dict__.pop("step")
    return {"total_s": total, "steps": steps[0], "stages_s": dict(timers.seconds), "tokens": tokens}


def count_ops(llm, width: int, seed: int) -> tuple[float, float]:
    """aten ops per step dispatched by runner.execute (the forward is the stand-in: ~1 op) and,
    of those, by _copy_kv_blocks."""
    runner, counters = llm.client.core.runner, {"execute": OpCounter(), "copy": OpCounter()}
    steps = [0]
    originals = {name: getattr(runner, name) for name in ("execute", "_copy_kv_blocks")}

    def counted(name, key):
        def call(*args):
            if key == "execute":
                steps[0] += 1
            with counters[key]:
                return originals[name](*args)
        return call

    runner.execute, runner._copy_kv_blocks = counted("execute", "execute"), counted("_copy_kv_blocks", "copy")
    try:
        generate(llm, width, seed)
    finally:
        del runner.execute, runner._copy_kv_blocks
    per_step = {k: sum(c.counts.values()) / steps[0] for k, c in counters.items()}
    return per_step["execute"], per_step["copy"]


def report(width: int, results: dict[int, list[dict]], ops: dict[int, tuple[float, float]]) -> None:
    print(f"\n== Host time per decode step, {PROMPT_LEN}-token prompt, {NEW_TOKENS} new tokens, "
          f"tiny model + stand-in forward, 3B KV shape; median of {len(results[1])} runs (us per step)")
    stages = list(dict.fromkeys(s for runs in results.values() for s in runs[0]["stages_s"]))
    print(f"  {'stage':44s} {'greedy':>9s} {f'width {width}':>9s}")
    for stage in stages:
        cells = [statistics.median(r["stages_s"].get(stage, 0.0) / r["steps"] for r in results[w]) * 1e6
                 for w in (1, width)]
        print(f"  {stage:44s} {cells[0]:9.0f} {cells[1]:9.0f}")
    for label, index in (("aten ops per step in runner.execute", 0), ("  of which _copy_kv_blocks", 1)):
        print(f"  {label:44s} {ops[1][index]:9.1f} {ops[width][index]:9.1f}")
    for w in (1, width):
        runs = ", ".join(f"{r['total_s']:.3f}" for r in results[w])
        print(f"  width {w}: {results[w][0]['steps']} steps; wall per run (s): {runs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--width", type=int, default=4)
    parser.add_argument("--profile", help="write a cProfile of one beam run here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    llm = make_llm()
    results, ops = {}, {}
    for width in (1, args.width):
        generate(llm, width, seed=0)   # warm-up
        results[width] = [run_once(llm, width, seed=1) for _ in range(args.runs)]
        assert all(r["tokens"] == results[width][0]["tokens"] for r in results[width])
        ops[width] = count_ops(llm, width, seed=1)
    if args.profile:
        profile = cProfile.Profile()
        run_once(llm, args.width, seed=1, profile=profile)
        profile.dump_stats(args.profile)
    report(args.width, results, ops)
    tokens = results[args.width][0]["tokens"]
    print(f"  beam tokens crc32 (the same before and after a change): {zlib.crc32(str(tokens).encode()):08x}")


if __name__ == "__main__":
    main()
