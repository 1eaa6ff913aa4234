"""Structured outputs on the GPU (issue 17), 3B shape with dummy weights; prints a table:

  1. W1 with every request carrying its own ~10-field JSON schema (fresh schemas every run, so
     every compile is paid) against unconstrained W1: output tokens/s (target >= 0.9x).
  2. Bitmask work at batch 256: building the rows on the CPU (matchers fill) and masking the
     logits on the GPU, against the decode step time (target <= 5%). The build overlaps the step's
     forward (engine.core builds it between execute_model and sample_tokens): besides its host time
     the table gives its EXPOSED time, the part during which the GPU had nothing left to run.
  3. TTFT of one short request: unconstrained, a new schema (target +50 ms at p50), the same
     schema again (cached: target +1 ms).

    python bench/structured_outputs.py [--requests 256] [--runs 2] [--backend auto]
    python bench/structured_outputs.py --host-only    # no GPU: bitmask build and CPU apply at batch 256
Caller: by hand, bench/run_gpu.sh.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import time
from pathlib import Path

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


class BuildTimer:
    """Wraps scheduler.get_grammar_bitmask without synchronising: host seconds of each build, and
    CUDA events recorded just before and after it. The GPU time between the two events is the
    exposed part: 0 while the step's forward still runs, the whole build when the GPU sat idle.
    Under async scheduling the build runs in the manager's fill thread and this is the core
    thread's join wait (the build's start, in the update, is not in it)."""

    def __init__(self, scheduler):
        self.host_seconds, self.events = 0.0, []
        self._scheduler, original = scheduler, scheduler.get_grammar_bitmask

        def timed(scheduler_output):
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start = time.perf_counter()
            before.record()
            bitmask = original(scheduler_output)
            after.record()
            self.host_seconds += time.perf_counter() - start
            self.events.append((before, after))
            return bitmask

        scheduler.get_grammar_bitmask = timed

    def exposed_seconds(self) -> float:
        torch.cuda.synchronize()
        return sum(before.elapsed_time(after) for before, after in self.events) / 1e3

    def restore(self) -> None:
        del self._scheduler.get_grammar_bitmask


def bitmask_share(llm, num_requests: int) -> dict:
    """An instrumented constrained W1 run, nothing synchronised: per step, the bitmask build's host
    time and exposed time, and core.step's wall time; the GPU masking measured alone at batch
    num_requests over the model's vocabulary (the Triton kernel, and the torch reference)."""
    core = llm.client.core
    build, step_seconds, original_step = BuildTimer(core.scheduler), [], core.step

    def timed_step():
        start = time.perf_counter()
        outputs = original_step()
        step_seconds.append(time.perf_counter() - start)
        return outputs

    core.step = timed_step
    try:
        w1_run(llm, num_requests, seed=4242, constrained=True)
    finally:
        del core.step
        build.restore()
    vocab = core.scheduler.structured_output.vocab_size
    apply_ms = {name: 1e3 * apply_seconds(num_requests, vocab, force_reference=name == "torch")
                for name in ("triton", "torch")}
    num_steps, step = len(step_seconds), sum(step_seconds) / max(1, len(step_seconds))
    build_s, exposed_s = build.host_seconds / max(1, num_steps), build.exposed_seconds() / max(1, num_steps)
    return {"bitmask_build_ms": 1e3 * build_s, "bitmask_build_exposed_ms": 1e3 * exposed_s,
            "bitmask_apply_ms": apply_ms["triton"], "bitmask_apply_torch_ms": apply_ms["torch"], "step_ms": 1e3 * step,
            "share": (build_s + apply_ms["triton"] / 1e3) / step,
            "share_exposed": (exposed_s + apply_ms["triton"] / 1e3) / step}


def apply_seconds(num_rows: int, vocab: int, force_reference: bool = False, device: str = "cuda") -> float:
    """Median seconds of masking [num_rows, vocab] float32 logits with a random bitmask, the
    bitmask's host-to-device copy included (as in a step)."""
    from engine.sampler import apply_grammar_bitmask
    from vlserve_kernels import grammar_mask

    logits = torch.randn(num_rows, vocab, device=device)
    bitmask = torch.randint(-2 ** 31, 2 ** 31 - 1, (num_rows, (vocab + 31) // 32), dtype=torch.int32)
    rows = torch.arange(num_rows, device=device)
    times: list[float] = []
    for _ in range(20 if device == "cuda" else 6):
        with (harness.cuda_timer(times) if device == "cuda" else _host_timer(times)):
            if force_reference:
                grammar_mask._reference(logits, rows, bitmask.to(device, non_blocking=True))
            else:
                apply_grammar_bitmask(logits, rows, bitmask.to(device, non_blocking=True))
    return harness.median(times[len(times) // 4:])


@contextlib.contextmanager
def _host_timer(out: list):
    start = time.perf_counter()
    yield
    out.append(time.perf_counter() - start)


def host_only(num_requests: int, model: str, backend: str) -> None:
    """No GPU, the grammar work of one step at batch num_requests (each request its own schema) with
    the model's tokenizer: the frontend's check of each new schema (serial: LLM.generate makes every
    request before the first step), compile of all the schemas submitted at once, the bitmask build,
    and the matchers' accept of the step's tokens, per request (accept_tokens) and batched (accept_batch: the
    scheduler's path); the CPU mask (torch reference) at the model's vocabulary."""
    import types

    from transformers import AutoTokenizer

    from engine import StructuredOutputsParams
    from engine.structured_output import StructuredOutputsConfig
    from engine.structured_output.manager import StructuredOutputManager
    from engine.structured_output.resolve import resolve_structured_outputs

    path = harness.model_dir(model)
    config = json.loads((Path(path) / "config.json").read_text())
    vocab = config.get("text_config", {}).get("vocab_size") or config["vocab_size"]
    start = time.perf_counter()   # the frontend's check of each new schema, before it is queued
    for _ in range(num_requests):
        resolve_structured_outputs(StructuredOutputsParams(json=make_schema(random.getrandbits(40))),
                                   StructuredOutputsConfig(backend=backend))
    check_s = time.perf_counter() - start
    manager = StructuredOutputManager(StructuredOutputsConfig(backend=backend),
                                      lambda: AutoTokenizer.from_pretrained(path), vocab)
    manager.add_request("warm", StructuredOutputsParams(json=make_schema(0))).compiled.result()   # tokenizer
    start = time.perf_counter()

    def requests_for(prefix: str) -> list:   # a second set shares the first's (cached) compiles
        return [types.SimpleNamespace(req_id=f"{prefix}{i}", num_computed_tokens=10, num_tokens=11,   # each samples
                                      structured_output=manager.add_request(
                                          f"{prefix}{i}", StructuredOutputsParams(json=make_schema(1000 + i))))
                for i in range(num_requests)]

    requests = requests_for("r")
    for request in requests:
        request.structured_output.compiled.result()
    compile_s = time.perf_counter() - start
    twins = requests_for("t")   # advanced per request, as before accept_batch
    for request in requests + twins:
        assert manager.grammar_status(request.structured_output) == "ready"
    build, batched, per_request = step_times(manager, requests, twins)
    waits, inline = zip(*(threaded_build_wait(manager, requests) for _ in range(15)))
    manager.shutdown()
    rows = [(f"request check of {num_requests} new schemas, frontend, one thread (ms)", 1e3 * check_s),
            (f"compile {num_requests} schemas submitted at once, until all ready (ms)", 1e3 * compile_s),
            ("  compile pool threads / CPUs", f"{manager.num_compile_threads} / {os.cpu_count()}"),
            (f"bitmask build at batch {num_requests}, host (ms)", 1e3 * build),
            ("  the same matchers' build again, inline (ms)", 1e3 * harness.median(inline[3:])),
            (f"  the same in the fill thread: the core's wait after {1e3 * OTHER_WORK_S:g} ms of Python (ms)",
             1e3 * harness.median(waits[3:])),
            (f"matcher accept at batch {num_requests}, per request, accept_tokens (ms)", 1e3 * per_request),
            (f"matcher accept at batch {num_requests}, batched, accept_batch (ms)", 1e3 * batched),
            (f"bitmask apply at batch {num_requests} x {vocab}, CPU torch (ms)",
             1e3 * apply_seconds(num_requests, vocab, force_reference=True, device="cpu"))]
    harness.print_table(f"Structured outputs host-only ({backend}), {model} vocabulary, "
                        f"{torch.get_num_threads()} torch threads", rows)


OTHER_WORK_S = 3e-3   # the rest of a W1 step's update, the output processing and the next schedule, here


def threaded_build_wait(manager, requests: list) -> float:
    """-> (seconds the core's thread waits in take_bitmask for a build started OTHER_WORK_S of pure
    Python earlier (async scheduling: the build overlaps the rest of the step), seconds of the same
    build inline right after); the masks must be equal. The matchers stay put: warmer than a step's."""
    manager.start_bitmask(requests)
    deadline = time.perf_counter() + OTHER_WORK_S
    while time.perf_counter() < deadline:
        sum(range(100))   # holds the GIL as the scheduler's Python does
    start = time.perf_counter()
    threaded = manager.take_bitmask()
    wait = time.perf_counter() - start
    start = time.perf_counter()
    inline = manager.grammar_bitmask(requests, {r.req_id: 1 for r in requests})
    inline_s = time.perf_counter() - start
    assert threaded.req_ids == inline.req_ids and torch.equal(threaded.bitmask, inline.bitmask)
    return wait, inline_s


def first_allowed(row: torch.Tensor) -> int:
    """The lowest token id a bitmask row [ceil(vocab / 32)] int32 allows (EOS at a grammar's end)."""
    word = int(row.ne(0).nonzero()[0])
    value = int(row[word]) & 0xFFFFFFFF
    return 32 * word + (value & -value).bit_length() - 1


def step_times(manager, requests: list, twins: list, num_steps: int = 40) -> tuple[float, float, float]:
    """Median seconds per step of (bitmask build, accept_batch, accept_tokens per request): each
    step every request takes one random allowed token; `twins` (same grammars) take the same tokens
    one request at a time and must agree. Both accepts start with cold caches, as in the engine."""
    rng, build, batched, per_request = random.Random(0), [], [], []
    flush = torch.empty(16 << 20, dtype=torch.int32)   # 64 MB: more than the CPU caches
    for _ in range(num_steps):
        start = time.perf_counter()
        bitmask = manager.grammar_bitmask(requests, {r.req_id: 1 for r in requests})
        build.append(time.perf_counter() - start)
        words = bitmask.bitmask[:, :64].tolist()   # ids < 2048: ASCII-ish tokens of both tokenizers
        tokens = [rng.choice([32 * w + b for w, v in enumerate(row) for b in range(32) if v >> b & 1]
                             or [first_allowed(bitmask.bitmask[i])]) for i, row in enumerate(words)]
        manager.grammar_bitmask(twins, {r.req_id: 1 for r in twins})   # as every step's matchers
        verdicts: list[bool] = []
        for batch in ((True, False) if len(build) % 2 else (False, True)):   # either first, in turn
            flush.fill_(len(build))   # a step's other work lies between a build and the next accept
            start = time.perf_counter()
            if batch:
                verdicts = manager.accept_batch([r.structured_output for r in requests], tokens)
            else:
                twin_verdicts = [manager.accept_tokens(r.structured_output, [token]) for r, token in zip(twins, tokens)]
            (batched if batch else per_request).append(time.perf_counter() - start)
        assert verdicts == twin_verdicts
    skip = num_steps // 8
    return harness.median(build[skip:]), harness.median(batched[skip:]), harness.median(per_request[skip:])


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
    parser.add_argument("--host-only", action="store_true", help="no GPU: bitmask build and CPU apply only")
    args = parser.parse_args()
    if args.host_only:
        host_only(args.requests, args.model, "guidance" if args.backend == "auto" else args.backend)
        return
    llm, _ = harness.make_llm(harness.model_dir(args.model), max_model_len=4096,
                              structured_outputs_config={"backend": args.backend})
    result = {"backend": args.backend, "requests": args.requests, **w1(llm, args.requests, args.runs),
              **bitmask_share(llm, args.requests), **ttft(llm, args.trials)}
    rows = [("W1 unconstrained out tok/s", result["unconstrained"]), ("W1 own JSON schema out tok/s", result["json_schema"]),
            ("ratio (target >= 0.90)", result["ratio"]), ("bitmask build per step, CPU (ms)", result["bitmask_build_ms"]),
            ("bitmask build per step exposed, GPU idle (ms)", result["bitmask_build_exposed_ms"]),
            (f"bitmask apply at batch {args.requests}, GPU (ms)", result["bitmask_apply_ms"]),
            (f"bitmask apply at batch {args.requests}, GPU torch reference (ms)", result["bitmask_apply_torch_ms"]),
            ("engine step, constrained run (ms)", result["step_ms"]), ("bitmask share (target <= 0.05)", result["share"]),
            ("bitmask share exposed: (exposed build + apply) / step", result["share_exposed"]),
            ("TTFT unconstrained (ms)", result["ttft_unconstrained_ms"]),
            ("TTFT extra, new schema (target <= 50 ms)", result["ttft_new_schema_extra_ms"]),
            ("TTFT extra, cached schema (target <= 1 ms)", result["ttft_cached_schema_extra_ms"])]
    harness.print_table(f"Structured outputs ({args.backend}), {args.model} dummy weights", rows)
    print("  json:", harness.write_json("structured_outputs", result))


if __name__ == "__main__":
    main()
