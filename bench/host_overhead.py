"""Host (CPU, Python) overhead per engine step on the W1 shape, with no GPU and no model math:
256 requests of one fresh 448x448 image (through the real processor) + about 64 text tokens, 128
output tokens (ignore_eos, greedy), through LLM.generate on the tiny qwen2_5_vl checkpoint.

Everything is the real engine path (Frontend, Scheduler, KVCacheManager, InputBatch, Sampler,
OutputProcessor / detokenizer) except the model forward: `ModelRunner._forward` is replaced by a
stand-in returning rows of a fixed random hidden-state table (so the tower and the LM cost nothing
and greedy tokens still vary); the real (tiny) lm_head and sampler run on it. Per-stage time is
measured with perf_counter wrappers (nested stages are reported inside their parent; --cpu-time:
process_time, steadier when other jobs share the CPU), median of --runs runs after a warm-up.

--steady N models the serving steady state instead (W4: N concurrent clients): async scheduling, N
requests running, a new 448x448-image request (~64 text tokens) arriving each time one finishes
(arrivals staggered by a ramp of one request every 128/N steps, so one joins every few steps). The
requests are preprocessed before the clock starts; --steady-steps steps after the ramp are timed.

    python bench/host_overhead.py [--runs 3] [--requests 256] [--profile out.prof]
    python bench/host_overhead.py --steady 64 [--steady-steps 256] [--runs 3] [--cpu-time] [--profile out.prof]
    python bench/host_overhead.py --async-scheduling [--json-schema] [--runs 3]

--json-schema (issue 17): every request carries its own ~10-field JSON schema (bench/structured_outputs.py's
make_schema, fresh per run, so every compile is paid) and stops where the grammar ends (no ignore_eos); the
grammar stages (compile wait, bitmask build, matcher accept) are reported. Compare with the same command
without it; --async-scheduling runs the split step as on CUDA (bitmask built in the manager's fill thread
from the matchers' accept to the next step's sampling: "join" is the core thread's wait for it, "fill"
the thread's time, overlapped).
Caller: by hand (results in BENCHMARKS.md, "Host overhead per step (CPU, no GPU)").
"""

from __future__ import annotations

import argparse
import cProfile
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import harness  # noqa: E402

TEXT_TOKENS, OUTPUT_TOKENS, IMAGE_SIZE = 64, 128, (448, 448)
JSON_SCHEMA = False   # --json-schema: each request its own schema (see the docstring)


class HostTimers:
    """`wrap(obj, method, stage)`: the method's wall time is added to `stage` (no device sync)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock   # time.process_time (--cpu-time): this process's CPU time, steadier on a shared box
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list = []

    def wrap(self, obj, method: str, stage: str) -> None:
        original = getattr(obj, method)

        clock = self.clock

        def timed(*args, **kwargs):
            start = clock()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] += clock() - start

        self.seconds[stage] += 0.0   # report in wrapping order
        self._undo.append((obj, method, original, method in vars(obj)))
        setattr(obj, method, timed)

    def restore(self) -> None:
        for obj, method, original, own in reversed(self._undo):
            if own:
                setattr(obj, method, original)
            else:
                delattr(obj, method)
        self._undo = []


def stand_in_forward(runner, hidden_size: int, max_rows: int):
    """Replaces the tower + LM: hidden state row i = a fixed random row (varied greedy tokens)."""
    table = torch.randn(max_rows, hidden_size, generator=torch.Generator().manual_seed(0))  # [max_rows, H]

    def forward(scheduler_output, batch):
        num_rows = batch.input_ids.shape[0]
        return table[:num_rows], {}                                                         # [T, H]

    runner._forward = forward


def make_llm(max_num_batched_tokens: int, **kwargs):
    from engine.llm import LLM
    from build_tiny import build

    path = REPO / "samples" / "models" / "out" / "qwen2_5_vl"
    if not (path / "config.json").exists():
        build("qwen2_5_vl", path)
    llm = LLM(model=str(path), device="cpu", dtype="float32", max_model_len=4096,
              max_num_batched_tokens=max_num_batched_tokens, num_gpu_blocks_override=256 * 24 + 64, **kwargs)
    runner = llm.client.core.runner
    stand_in_forward(runner, runner.text_config.hidden_size, max_num_batched_tokens + 256)
    return llm


CLOCK = time.perf_counter   # --cpu-time: time.process_time


def instrument(llm) -> HostTimers:
    from engine.detokenizer import OutputProcessor
    from engine.request_builder import RequestBuilder
    from engine.runner.step_output import StepOutput

    timers, core = HostTimers(CLOCK), llm.client.core
    runner = core.runner
    # Requests are built on worker threads (engine.request_builder), overlapped with the steps.
    timers.wrap(RequestBuilder, "take_ready", "preprocess (waiting for built requests)")
    timers.wrap(core, "step", "engine step (total)")
    timers.wrap(core.scheduler, "schedule", "  scheduler.schedule")
    timers.wrap(core.scheduler, "update_from_output", "  scheduler.update_from_output")
    timers.wrap(runner, "execute_async", "  runner.execute(_async)")
    timers.wrap(runner.input_batch, "update", "    input_batch.update")
    timers.wrap(runner, "_init_mrope_positions", "    M-RoPE positions (new requests)")
    timers.wrap(runner.input_batch, "prepare", "    input_batch.prepare (input prep)")
    timers.wrap(runner.input_batch, "sampling_batch", "      sampling_batch (sampler prep)")
    timers.wrap(runner, "_sample", "    _sample (tiny lm_head + sampler)")
    timers.wrap(StepOutput, "result", "  step output to host (append_sampled)")
    timers.wrap(OutputProcessor, "process", "output processing (detokenize)")
    if JSON_SCHEMA:   # [structured outputs] the manager's calls, inside the stages above
        manager = core.scheduler.structured_output
        timers.wrap(manager, "grammar_status", "  grammar_status (in schedule: compiled yet?)")
        timers.wrap(manager, "grammar_bitmask", "  grammar bitmask build (between forward and sampling)")
        timers.wrap(manager, "start_bitmask", "  grammar bitmask start (in update: rows, hand-off)")
        timers.wrap(manager, "take_bitmask", "  grammar bitmask join (waits for the fill thread)")
        timers.wrap(manager, "_fill_matchers", "  bitmask fill (inline, or in the fill thread: overlapped)")
        timers.wrap(manager, "accept_tokens", "  matcher accept (in update_from_output)")
        timers.wrap(manager, "accept_batch", "  matcher accept (in update_from_output)")
    return timers


def sampling_params(seed: int):
    """One SamplingParams per request: plain W1 (ignore_eos), or (--json-schema) its own schema each."""
    from engine.sampling_params import SamplingParams
    from engine.structured_output import StructuredOutputsParams
    from structured_outputs import make_schema

    if not JSON_SCHEMA:
        return SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    return SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS,
                          structured_outputs=StructuredOutputsParams(json=make_schema(seed)))


def run_once(llm, num_requests: int, seed: int, profile: cProfile.Profile | None = None) -> dict:
    tokenizer = llm.get_tokenizer()
    images = harness.fresh_images(num_requests, IMAGE_SIZE, seed)
    prompts = [{"prompt": harness.IMAGE_PROMPT + harness.text_of_tokens(tokenizer, TEXT_TOKENS, seed * 100003 + i),
                "multi_modal_data": {"image": image}} for i, image in enumerate(images)]
    params = [sampling_params(seed * 100003 + i) for i in range(num_requests)]
    timers = instrument(llm)
    steps = [0]
    step = llm.client.step

    def counted_step():
        steps[0] += 1
        return step()

    llm.client.step = counted_step
    start = time.perf_counter()
    if profile is not None:
        profile.enable()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    if profile is not None:
        profile.disable()
    total = time.perf_counter() - start
    timers.restore()
    llm.client.__dict__.pop("step")
    assert all(len(o.outputs[0].token_ids) == OUTPUT_TOKENS or o.outputs[0].finish_reason == "stop" for o in outputs)
    return {"total_s": total, "steps": steps[0], "stages_s": dict(timers.seconds),
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}


def make_requests(llm, count: int, seed: int) -> list:
    """count EngineRequests of the W4 shape (one fresh image + ~64 text tokens, 128 output tokens)."""
    tokenizer = llm.get_tokenizer()
    requests = []
    for i, image in enumerate(harness.fresh_images(count, IMAGE_SIZE, seed)):
        prompt = harness.IMAGE_PROMPT + harness.text_of_tokens(tokenizer, TEXT_TOKENS, seed * 100003 + i)
        request, _ = llm._request_from_prompt({"prompt": prompt, "multi_modal_data": {"image": image}},
                                              sampling_params(seed * 100003 + i), f"steady-{seed}-{i}")
        requests.append(request)
    return requests


def run_steady(llm, concurrency: int, num_steps: int, seed: int,
               profile: cProfile.Profile | None = None) -> dict:
    """Serving steady state: `concurrency` in flight, a new request as soon as one finishes.
    Only the `num_steps` steps after the ramp are timed (timers reset at the ramp's end)."""
    from engine.detokenizer import OutputProcessor

    ramp_steps = OUTPUT_TOKENS + 8
    pending = make_requests(llm, concurrency + (ramp_steps + num_steps) * concurrency // OUTPUT_TOKENS + 16, seed)
    processor, client = OutputProcessor(llm.frontend.tokenizer), llm.client
    timers = instrument(llm)
    num_done = start = 0

    def admit(num_allowed: int) -> None:
        for _ in range(min(num_allowed, concurrency - len(processor.states))):
            request = pending.pop()
            for child in processor.add(request, None).children:
                client.add_request(child)

    for step in range(ramp_steps + num_steps):
        if step == ramp_steps:   # steady from here on: time only these steps
            timers.seconds = defaultdict(float, {stage: 0.0 for stage in timers.seconds})
            num_done, start = 0, CLOCK()
            if profile is not None:
                profile.enable()
        admit(concurrency if step >= ramp_steps - 8 else int(step % max(1, OUTPUT_TOKENS // concurrency) == 0))
        states, stop_string_hits = processor.process(client.step().outputs)
        num_done += sum(1 for state in states if state.finished)
    if profile is not None:
        profile.disable()
    total = CLOCK() - start
    timers.restore()
    for req_id in list(processor.states):   # leave the engine empty for the next run
        client.abort_requests(processor.abort(req_id)[1])
    while client.has_unfinished_requests():
        client.step()
    return {"total_s": total, "steps": num_steps, "stages_s": dict(timers.seconds), "num_finished": num_done,
            "num_prompt_tokens": len(pending[0].prompt_token_ids)}


def report(results: list[dict], title: str = "W1 shape") -> None:
    steps = results[0]["steps"]
    median_total = statistics.median(r["total_s"] for r in results)
    print(f"\n== Host overhead, {title} on the CPU (stand-in model), median of {len(results)} runs")
    runs = ", ".join(f"{r['total_s']:.3f}" for r in results)
    print(f"  steps per run: {steps}; wall per run: {median_total:.3f} s (runs {runs})")
    if "output_tokens" in results[0]:
        print(f"  output tokens per run: {statistics.median(r['output_tokens'] for r in results):.0f}")
    print(f"  {'stage':52s} {'s per run':>10s} {'us per step':>12s}")
    for stage in results[0]["stages_s"]:
        seconds = statistics.median(r["stages_s"].get(stage, 0.0) for r in results)
        print(f"  {stage:52s} {seconds:10.3f} {seconds / steps * 1e6:12.0f}")
    step_s = statistics.median(r["stages_s"]["engine step (total)"] for r in results)
    detok_s = statistics.median(r["stages_s"]["output processing (detokenize)"] for r in results)
    print(f"  {'per-step host overhead (step + output processing)':52s} {step_s + detok_s:10.3f} "
          f"{(step_s + detok_s) / steps * 1e6:12.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--profile", help="write a cProfile of the last run here")
    parser.add_argument("--steady", type=int, help="serving steady state with this many requests in flight")
    parser.add_argument("--steady-steps", type=int, default=256)
    parser.add_argument("--cpu-time", action="store_true", help="stage times in this process's CPU time")
    parser.add_argument("--json-schema", action="store_true", help="every request its own ~10-field JSON schema")
    parser.add_argument("--async-scheduling", action="store_true", help="W1: the split step of CUDA runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    global JSON_SCHEMA
    JSON_SCHEMA = args.json_schema
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    if args.steady:
        main_steady(args)
        return
    llm = make_llm(args.max_num_batched_tokens, async_scheduling=args.async_scheduling)
    run_once(llm, min(args.requests, 16), seed=0)   # warm-up
    results = [run_once(llm, args.requests, seed=1 + i) for i in range(args.runs)]
    if args.profile:
        profile = cProfile.Profile()
        run_once(llm, args.requests, seed=100, profile=profile)
        profile.dump_stats(args.profile)
    report(results)


def main_steady(args) -> None:
    llm = make_llm(args.max_num_batched_tokens, async_scheduling=True)
    run_steady(llm, args.steady, 32, seed=0)   # warm-up
    results = [run_steady(llm, args.steady, args.steady_steps, seed=1 + i) for i in range(args.runs)]
    if args.profile:
        profile = cProfile.Profile()
        run_steady(llm, args.steady, args.steady_steps, seed=100, profile=profile)
        profile.dump_stats(args.profile)
    finished = ", ".join(str(r["num_finished"]) for r in results)
    report(results, f"serving steady state ({args.steady} in flight, {results[0]['num_prompt_tokens']} prompt "
                    f"tokens, requests finished per run: {finished})")


if __name__ == "__main__":
    main()
