"""W4 serving: `vlserve bench serve` (app/benchmark) against `vlserve serve` (python -m app, loopback)
at 1 / 16 / 64 concurrent clients, with the W4-VL load of issue 14: each request one fresh 448x448
PNG (base64 data URL) + 64 random letters, max_tokens 128, ignore_eos, streaming, temperature 0.
Per level: output tok/s, TTFT/TPOT/ITL/E2EL (vLLM's result block), images/s; the result JSONs of
every level go into bench/results/w4_serving.json.

    python bench/w4_serving.py [--model-dir DIR | --model qwen2_5_vl_3b] [--levels 1,16,64]
    python bench/w4_serving.py --base-url http://127.0.0.1:8000   # an already running server (vLLM too)
Caller: by hand, bench/run_gpu.sh when the app's dependencies are installed. The server is started
here as a child process (its own pid, ended at the end), with PYTHONPATH extended, not replaced
(the GPU image finds msgspec & co. on a carried wheel dir already on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

import harness

from app.benchmark.serve import benchmark, build_parser, check_args

SERVER_FLAGS = "--load-format dummy --max-model-len 8000 --gpu-memory-utilization 0.9"
LOAD_FLAGS = ("--dataset-name random-mm --image-size 448x448 --images-per-request 1 --input-len 64 "
              "--output-len 128 --ignore-eos --temperature 0 --disable-tqdm")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: str, port: int, flags: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "app", "--model", model_dir, "--host", "127.0.0.1", "--port", str(port),
           "--disable-log-requests", *flags]
    path = os.pathsep.join(filter(None, [str(harness.REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(cmd, cwd=harness.REPO, env=dict(os.environ, PYTHONPATH=path))


def wait_ready(server: subprocess.Popen, port: int, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server was not ready within {timeout_s:g} s")


def run_level(base_url: str, concurrency: int, num_prompts: int, seed: int) -> dict:
    """One `vlserve bench serve` run -> its result JSON (as --save-result writes it)."""
    argv = [*LOAD_FLAGS.split(), "--base-url", base_url, "--max-concurrency", str(concurrency),
            "--num-prompts", str(num_prompts), "--seed", str(seed)]
    args = build_parser().parse_args(argv)
    return asyncio.run(benchmark(args, check_args(args)))


def summary(result: dict) -> dict:
    keys = ("max_concurrency", "completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
            "output_throughput", "image_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
            "p99_tpot_ms", "median_itl_ms", "median_e2el_ms")
    return {key: result[key] for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2_5_vl_3b")
    parser.add_argument("--model-dir", default=None, help="an existing model directory instead of --model")
    parser.add_argument("--base-url", default=None, help="bench this running server instead of starting one")
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--min-prompts", type=int, default=64, help="requests per level: max(this, 4 x clients)")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--server-args", default=SERVER_FLAGS, help="flags of the started server")
    args = parser.parse_args()
    server, base_url = None, args.base_url
    if base_url is None:
        port = free_port()
        server = start_server(args.model_dir or harness.model_dir(args.model), port, args.server_args.split())
        base_url = f"http://127.0.0.1:{port}"
    try:
        if server is not None:
            wait_ready(server, port, args.start_timeout)
        levels = [run_level(base_url, c, max(args.min_prompts, 4 * c), seed=c)
                  for c in (int(x) for x in args.levels.split(","))]
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    rows = []
    for level in map(summary, levels):
        c = level["max_concurrency"]
        rows += [(f"c={c} output tok/s", level["output_throughput"]), (f"c={c} images/s", level["image_throughput"]),
                 (f"c={c} TTFT ms p50 / p99", f"{level['median_ttft_ms']:.1f} / {level['p99_ttft_ms']:.1f}"),
                 (f"c={c} TPOT ms p50 / p99", f"{level['median_tpot_ms']:.2f} / {level['p99_tpot_ms']:.2f}")]
    harness.print_table("W4 serving (vlserve bench serve, HTTP loopback, 448x448 PNG + 64 letters, 128 tokens)", rows)
    runs = [{key: value for key, value in r.items() if key != "generated_texts"} for r in levels]
    payload = {"levels": [summary(r) for r in levels], "runs": runs, "server_args": args.server_args,
               "base_url": args.base_url}
    print("  json:", harness.write_json("w4_serving", payload))

if __name__ == "__main__":
    main()
