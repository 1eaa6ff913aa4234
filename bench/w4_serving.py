"""W4 serving: the HTTP server (python -m app, loopback only) under 1 / 16 / 64 concurrent
clients, each streaming /v1/completions requests back to back (text prompts, fixed output length,
ignore_eos); TTFT and time per output token (TPOT) p50/p99, output tokens/s. Bounded: each level
sends a fixed number of requests and every request has a timeout.

    python bench/w4_serving.py [--model-dir DIR | --model qwen2_5_vl_3b] [--levels 1,16,64]
Caller: by hand, bench/run_gpu.sh when the app's dependencies are installed. The server is
started here as a child process (its own pid, ended at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import harness

OUTPUT_TOKENS, PROMPT_TOKENS = 128, 256


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: str, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "app", "--model", model_dir, "--host", "127.0.0.1", "--port", str(port),
           "--load-format", "dummy", "--max-model-len", "4096", *extra]
    return subprocess.Popen(cmd, cwd=harness.REPO, env=dict(os.environ, PYTHONPATH=str(harness.REPO)))


async def wait_healthy(client, base: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        try:
            if (await client.get(f"{base}/health")).status_code == 200:
                return
        except Exception:
            pass
        await asyncio.sleep(0.5)
    raise TimeoutError("server not healthy in time")


async def one_request(client, base: str, model: str, prompt: str) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": OUTPUT_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    start, first, chunks = time.perf_counter(), None, 0
    async with client.stream("POST", f"{base}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if json.loads(line[6:])["choices"][0].get("text"):
                first = first or time.perf_counter()
                chunks += 1
    end = time.perf_counter()
    ttft = (first or end) - start
    return {"ttft": ttft, "tpot": (end - (first or end)) / max(1, OUTPUT_TOKENS - 1), "latency": end - start}


async def run_level(client, base: str, model: str, prompt: str, concurrency: int, per_client: int) -> dict:
    async def worker():
        return [await one_request(client, base, model, prompt) for _ in range(per_client)]

    start = time.perf_counter()
    results = [r for batch in await asyncio.gather(*(worker() for _ in range(concurrency))) for r in batch]
    elapsed = time.perf_counter() - start

    def pct(key, q):
        values = sorted(r[key] for r in results)
        return values[min(len(values) - 1, int(q * len(values)))] * 1e3

    return {"concurrency": concurrency, "requests": len(results), "seconds": elapsed,
            "output_tokens_per_s": len(results) * OUTPUT_TOKENS / elapsed,
            "ttft_ms_p50": pct("ttft", 0.5), "ttft_ms_p99": pct("ttft", 0.99),
            "tpot_ms_p50": pct("tpot", 0.5), "tpot_ms_p99": pct("tpot", 0.99)}


async def main_async(args) -> dict:
    import httpx

    model_dir = args.model_dir or harness.model_dir(args.model)
    port = free_port()
    server = start_server(model_dir, port, args.server_args.split())
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=httpx.Limits(max_connections=256)) as client:
            await wait_healthy(client, base, server, args.start_timeout)
            model = (await client.get(f"{base}/v1/models")).json()["data"][0]["id"]
            prompt = harness.text_of_tokens(harness.tokenizer_of(model_dir), PROMPT_TOKENS, seed=4)
            await one_request(client, base, model, prompt)   # warm-up
            levels = []
            for concurrency in args.levels:
                levels.append(await run_level(client, base, model, prompt, concurrency,
                                              max(1, args.requests_per_level // concurrency)))
            return {"levels": levels, "model_dir": model_dir}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2_5_vl_3b")
    parser.add_argument("--model-dir", default=None, help="an existing model directory instead of --model")
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--requests-per-level", type=int, default=128)
    parser.add_argument("--start-timeout", type=float, default=180.0)
    parser.add_argument("--server-args", default="", help="extra server flags, e.g. '--device cpu'")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    result = asyncio.run(main_async(args))
    rows = []
    for level in result["levels"]:
        c = level["concurrency"]
        rows += [(f"c={c} output tok/s", level["output_tokens_per_s"]),
                 (f"c={c} TTFT ms p50 / p99", f"{level['ttft_ms_p50']:.1f} / {level['ttft_ms_p99']:.1f}"),
                 (f"c={c} TPOT ms p50 / p99", f"{level['tpot_ms_p50']:.2f} / {level['tpot_ms_p99']:.2f}")]
    harness.print_table("W4 serving (HTTP, loopback)", rows)
    print("  json:", harness.write_json("w4_serving", result))


if __name__ == "__main__":
    main()
