"""Engine-core CPU cost of moving requests in and outputs out (issue 14), on the CPU, W4-VL shape.

The real ProcessCore runs (spawned core process, its pipes and frame ring, the real encode / send /
receive / decode); only the EngineCore inside the child is a stand-in: like the real one it holds
each request (and so its frames) until it finishes, and it emits W4-shaped EngineOutputs (one new
token per running request per step, at most 64 running, 128 tokens each; a `--step-ms` sleep
stands for the GPU: this box has 2 cores, a spinning core would fight the API process for them).
In the child, run_core_loop's `receive` and `send` are wrapped with thread-CPU and wall timers.
Requests come from the real Frontend on the tiny qwen2_5_vl checkpoint: one fresh 448x448 image +
about 64 text tokens each, sent closed-loop by 64 "clients" (a finished request is replaced by a
new one), as `vlserve bench serve --max-concurrency 64` does.

Reported (median of --runs): core thread CPU us per request in receives that brought messages
(receive + decode; of it, the frames from the ring), CPU us per step of receives that brought
nothing, the step thread's wall us per request in non-blocking receives (a stall of the busy
loop), CPU us per step of output encode + send, the core process' CPU outside the stand-in's
step() per request (all the transport, every thread), and the API process' CPU per request in
send_request (on the caller's thread: the event loop in a server).

    python bench/transport_cost.py [--requests 256] [--runs 3] [--step-ms 5]
Caller: by hand (numbers in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "samples" / "models"))
sys.path.insert(0, str(REPO / "bench"))

CONCURRENCY, TEXT_TOKENS, OUTPUT_TOKENS, IMAGE_SIZE = 64, 64, 128, (448, 448)
RESULT_ENV = "VLSERVE_TRANSPORT_BENCH_OUT"
STEP_MS_ENV = "VLSERVE_TRANSPORT_BENCH_STEP_MS"


# ---------------------------------------------------------------- the core process' side (child)

class StandInCore:
    """EngineCore's interface to run_core_loop: W4-shaped outputs, no model. Like the real core it
    holds each request (and so its frames) until the request finishes."""

    def __init__(self, config) -> None:
        self.waiting: list = []             # EngineRequests
        self.running: dict[str, list] = {}  # req_id -> [EngineRequest, tokens emitted]
        self.step_s = float(os.environ.get(STEP_MS_ENV, "5")) / 1000

    def stats(self):
        from engine.protocol import SchedulerStats

        return SchedulerStats(num_running_reqs=len(self.running), num_waiting_reqs=len(self.waiting),
                              kv_cache_usage=0.5, num_generation_tokens=len(self.running),
                              num_free_blocks=1000, num_total_blocks=2000)

    def add_request(self, request) -> None:
        self.waiting.append(request)

    def abort_requests(self, req_ids) -> None:
        for req_id in req_ids:
            self.running.pop(req_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self):
        from engine.protocol import EngineOutput, EngineOutputs, FinishReason

        step_start = time.thread_time_ns()
        while self.waiting and len(self.running) < CONCURRENCY:
            request = self.waiting.pop(0)
            self.running[request.req_id] = [request, 0]
        time.sleep(self.step_s)
        outputs = []
        for req_id, state in list(self.running.items()):
            state[1] += 1
            done = state[1] == OUTPUT_TOKENS
            outputs.append(EngineOutput(req_id, [1000 + state[1]], finish_reason=FinishReason.LENGTH if done else None))
            if done:
                del self.running[req_id]
        outputs = EngineOutputs(outputs=outputs, stats=self.stats(), timestamp=time.time())
        STEP_NS[0] += time.thread_time_ns() - step_start
        return outputs


FRAME_COPY_NS = [0]   # of the receive time: frames out of the shared ring (when there is one)
STEP_NS = [0]         # thread CPU inside StandInCore.step


def time_frame_ring_receive() -> None:
    try:
        from engine.shared_frames import FrameRingReader
    except ImportError:   # before the ring existed
        return
    original = FrameRingReader.receive

    def timed(self, shared):
        cpu = time.thread_time_ns()
        try:
            return original(self, shared)
        finally:
            FRAME_COPY_NS[0] += time.thread_time_ns() - cpu

    FrameRingReader.receive = timed


def timed_run_core_loop(core, receive, send) -> None:
    """run_core_loop with its receive/send timed; writes the totals to $VLSERVE_TRANSPORT_BENCH_OUT."""
    from engine import core_host

    totals = {"receive_cpu_ns": 0, "receive_wall_ns": 0, "num_adds": 0, "send_cpu_ns": 0, "num_sends": 0,
              "empty_receive_cpu_ns": 0}

    def timed_receive(block: bool):
        cpu, wall = time.thread_time_ns(), time.perf_counter_ns()
        messages = receive(block)
        totals["receive_cpu_ns" if messages else "empty_receive_cpu_ns"] += time.thread_time_ns() - cpu
        if not block:   # a blocking receive's wall time is idle waiting, not a stall
            totals["receive_wall_ns"] += time.perf_counter_ns() - wall
        totals["num_adds"] += sum(tag == core_host.ADD for tag, _ in messages)
        return messages

    def timed_send(outputs) -> None:
        cpu = time.thread_time_ns()
        send(outputs)
        totals["send_cpu_ns"] += time.thread_time_ns() - cpu
        totals["num_sends"] += 1

    loop_start = time.process_time_ns()
    try:
        ORIGINAL_RUN_CORE_LOOP(core, timed_receive, timed_send)
    finally:
        totals["outside_step_cpu_ns"] = time.process_time_ns() - loop_start - STEP_NS[0]
        totals["frame_copy_ns"] = FRAME_COPY_NS[0]
        Path(os.environ[RESULT_ENV]).write_text(json.dumps(totals))


if __name__ == "__mp_main__":   # this script imported by the spawned core process: install the stand-ins
    import engine.core
    import engine.core_host

    ORIGINAL_RUN_CORE_LOOP = engine.core_host.run_core_loop
    time_frame_ring_receive()
    engine.core.EngineCore = StandInCore
    engine.core_host.run_core_loop = timed_run_core_loop


# ---------------------------------------------------------------- the API process' side

def make_requests(frontend, num_requests: int, seed: int) -> list:
    import harness
    from engine.frontend import MediaInput
    from engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    images = harness.fresh_images(num_requests, IMAGE_SIZE, seed)
    return [frontend.make_request(f"r{seed}-{i}", harness.IMAGE_PROMPT + harness.text_of_tokens(
                                      frontend.tokenizer, TEXT_TOKENS, seed * 100003 + i),
                                  [MediaInput("image", image)], params)
            for i, image in enumerate(images)]


def run_once(config, requests: list, step_ms: float) -> dict:
    from engine.core_host import ProcessCore

    result_path = Path(tempfile.mkdtemp(prefix="transport_bench_")) / "core.json"
    os.environ[RESULT_ENV], os.environ[STEP_MS_ENV] = str(result_path), str(step_ms)
    pending, finished, done = list(reversed(requests)), [0], threading.Event()
    send_cpu_ns = [0]
    core: ProcessCore | None = None

    def send_next() -> None:
        if pending:
            cpu = time.thread_time_ns()
            core.send_request(pending.pop())
            send_cpu_ns[0] += time.thread_time_ns() - cpu

    def on_outputs(outputs) -> None:
        for output in outputs.outputs:
            if output.finish_reason is not None:
                finished[0] += 1
                send_next()
        if finished[0] == len(requests):
            done.set()

    core = ProcessCore(config, on_outputs, lambda message: (print("core died:", message), done.set()))
    start = time.perf_counter()
    for _ in range(CONCURRENCY):
        send_next()
    done.wait(600)
    wall_s = time.perf_counter() - start
    core.close(10.0)
    totals = json.loads(result_path.read_text())
    num = len(requests)
    return {"receive_cpu_us_per_req": totals["receive_cpu_ns"] / num / 1e3,
            "  of which frames from the ring": totals["frame_copy_ns"] / num / 1e3,
            "empty_receive_cpu_us_per_step": totals["empty_receive_cpu_ns"] / totals["num_sends"] / 1e3,
            "receive_wall_us_per_req": totals["receive_wall_ns"] / num / 1e3,
            "send_cpu_us_per_step": totals["send_cpu_ns"] / totals["num_sends"] / 1e3,
            "core_process_cpu_outside_step_us_per_req": totals["outside_step_cpu_ns"] / num / 1e3,
            "api_send_request_cpu_us_per_req": send_cpu_ns[0] / num / 1e3,
            "steps": totals["num_sends"], "adds": totals["num_adds"], "wall_s": wall_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=5.0)
    args = parser.parse_args()
    from build_tiny import build
    from engine.config_loader import create_engine_config
    from engine.frontend import Frontend

    path = REPO / "samples" / "models" / "out" / "qwen2_5_vl"
    if not (path / "config.json").exists():
        build("qwen2_5_vl", path)
    config = create_engine_config(model=str(path), dtype="float32", max_model_len=4096)
    frontend = Frontend(config)
    results = [run_once(config, make_requests(frontend, args.requests, seed), args.step_ms)
               for seed in range(args.runs)]
    request = make_requests(frontend, 1, 99)[0]
    print(f"\n== Transport cost, W4-VL shape ({args.requests} requests, {CONCURRENCY} at a time, {OUTPUT_TOKENS} "
          f"tokens, step {args.step_ms:g} ms), median of {args.runs} runs; frames per request "
          f"{sum(len(item.frames) for item in request.mm_items):,} bytes")
    for key in results[0]:
        values = [r[key] for r in results]
        print(f"  {key:36s} {statistics.median(values):12.1f}   (runs: {', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
