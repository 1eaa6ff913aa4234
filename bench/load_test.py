"""Load test of the HTTP server on loopback: N requests (default 1,000) from C concurrent clients
(default 64), mixed valid and invalid media, a third of them disconnecting at a random point.

    python bench/load_test.py [--model DIR] [--num-requests 1000] [--concurrency 64] [--device cpu]

Starts `python -m app` on 127.0.0.1 (a free port), warms up, then asserts:
  - no request hangs (each has a deadline; the run has one too);
  - every request ends with a result (200 + a complete body / stream ending in [DONE]) or an
    OpenAI-shaped error (JSON {"error": {message, type, code}}, 4xx or 503), unless we cut it;
  - every KV block is free at the end (/metrics: KV usage 0, nothing running);
  - resident memory (server + engine process) at the end is within 10% of after warm-up.
Prints a table; exits 1 if any check fails. Loopback only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent


def png_url(width: int, height: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request_kinds() -> dict[str, tuple[dict, int | None]]:
    """kind -> (chat body, expected status or None for 200)."""
    def body(*parts, **extra):
        content = [*parts, {"type": "text", "text": "Describe it."}]
        return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}

    image = lambda url: {"type": "image_url", "image_url": {"url": url}}  # noqa: E731
    valid = png_url(56, 56, 0)
    return {
        "image": (body(image(valid)), None),
        "image_distinct": (body(image(png_url(84, 56, 1))), None),
        "text_long": ({"model": "tiny", "messages": [{"role": "user", "content": "count"}], "max_tokens": 48,
                       "ignore_eos": True}, None),
        "bad_base64": (body(image("data:image/png;base64,@@@@")), 400),
        "truncated_png": (body(image(valid[:300])), 400),
        "aspect_10000": (body(image(png_url(1, 10000, 2))), 400),
        "internal_url": (body(image("http://169.254.169.254/latest/meta-data")), 400),
        "bad_n": (body(image(valid), n=100000), 400),
    }


def is_openai_error(response_text: str, status: int) -> bool:
    try:
        error = json.loads(response_text)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error.get("message"), str) and error.get("code") == status and "Traceback" not in response_text


async def one_request(client: httpx.AsyncClient, body: dict, expected: int | None, disconnect: bool,
                      rng: random.Random, deadline_s: float) -> str:
    """-> 'ok' | 'error' | 'cut' | 'bad:<why>' | 'hang'."""
    stream = disconnect and rng.random() < 0.5 or rng.random() < 0.3
    work = _stream(client, body, expected, rng.randint(1, 4) if disconnect else None) if stream \
        else _plain(client, body, expected)
    try:
        if disconnect and not stream:
            return await asyncio.wait_for(work, rng.uniform(0.01, 1.0))
        return await asyncio.wait_for(work, deadline_s)
    except asyncio.TimeoutError:
        return "cut" if disconnect else "hang"


async def _plain(client, body, expected) -> str:
    response = await client.post("/v1/chat/completions", json=body)
    return _judge(response.status_code, response.text, expected, complete=True)


async def _stream(client, body, expected, cut_after: int | None) -> str:
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            return _judge(response.status_code, (await response.aread()).decode(), expected, complete=True)
        lines = 0
        async for line in response.aiter_lines():
            lines += line.startswith("data: ")
            if cut_after is not None and lines >= cut_after:
                return "cut"
            if line.startswith('data: {"error"'):
                return "error"
            if line == "data: [DONE]":
                return _judge(200, "", expected, complete=True)
    return "bad:stream ended without [DONE]"


def _judge(status: int, text: str, expected: int | None, complete: bool) -> str:
    if status == 200:
        return "ok" if expected is None else f"bad:200 for an invalid request ({expected} expected)"
    if not is_openai_error(text, status):
        return f"bad:{status} without an OpenAI error body"
    if status == 503 or status == expected:
        return "error"
    return f"bad:status {status} ({expected or 200} expected)"


def rss_kib(pid: int) -> int:
    """Resident memory of pid and its children (the engine core), KiB."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(entry.name) != pid and int(stat.rsplit(")", 1)[1].split()[1]) != pid:
                continue
            status = (entry / "status").read_text()
        except (OSError, ValueError, IndexError):
            continue
        total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
    return total


async def kv_state(client: httpx.AsyncClient) -> tuple[float, float]:
    text = (await client.get("/metrics")).text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(("vlserve:kv_cache_usage_perc", "vlserve:num_requests_running"))}
    return values["vlserve:kv_cache_usage_perc"], values["vlserve:num_requests_running"]


async def run_load(base_url: str, num_requests: int, concurrency: int, seed: int, deadline_s: float):
    kinds = request_kinds()
    names = sorted(kinds)
    rng = random.Random(seed)
    plan = [(rng.choice(names), rng.random() < 1 / 3) for _ in range(num_requests)]
    results: list[tuple[str, bool, str, float]] = []
    queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)

    async def worker(worker_rng: random.Random) -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=None) as client:
            while not queue.empty():
                kind, disconnect = queue.get_nowait()
                started = time.monotonic()
                body, expected = kinds[kind]
                outcome = await one_request(client, body, expected, disconnect, worker_rng, deadline_s)
                results.append((kind, disconnect, outcome, time.monotonic() - started))

    await asyncio.gather(*(worker(random.Random(seed * 1000 + i)) for i in range(concurrency)))
    return results


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "app", "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
               "--served-model-name", "tiny", "--device", args.device, "--max-model-len", "1024",
               "--max-num-seqs", "32", "--num-gpu-blocks-override", "512", "--disable-log-requests",
               "--max-waiting-requests", str(args.max_waiting_requests)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited during start-up:\n{process.stderr.read()[-3000:]}")
        try:
            if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                return process, base_url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit("the server did not start within 600 s")


async def wait_kv_free(base_url: str, timeout_s: float) -> tuple[float, float]:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        deadline = time.monotonic() + timeout_s
        state = await kv_state(client)
        while state != (0.0, 0.0) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            state = await kv_state(client)
        return state


def print_table(results, elapsed_s: float, rss_warm: int, rss_end: int, kv_end) -> None:
    table = Counter((kind, "disconnect" if cut else "complete", outcome.split(":")[0]) for kind, cut, outcome, _ in
                    results)
    print(f"{'kind':<16}{'client':<12}{'outcome':<8}{'count':>7}")
    for (kind, client, outcome), count in sorted(table.items()):
        print(f"{kind:<16}{client:<12}{outcome:<8}{count:>7}")
    latencies = sorted(seconds for _, cut, outcome, seconds in results if outcome == "ok")
    if latencies:
        print(f"ok latency p50 {latencies[len(latencies) // 2]:.2f} s, p99 {latencies[int(len(latencies) * .99)]:.2f} s,"
              f" max {latencies[-1]:.2f} s")
    print(f"{len(results)} requests in {elapsed_s:.1f} s ({len(results) / elapsed_s:.1f} req/s); "
          f"RSS after warm-up {rss_warm / 1024:.0f} MiB, at the end {rss_end / 1024:.0f} MiB "
          f"({100 * (rss_end - rss_warm) / rss_warm:+.1f}%); KV usage / running at the end {kv_end}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "samples/models/out/qwen2_5_vl"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup-requests", type=int, default=128)
    parser.add_argument("--request-deadline", type=float, default=180.0, help="seconds before a request 'hangs'")
    parser.add_argument("--max-waiting-requests", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    process, base_url = start_server(args)
    try:
        asyncio.run(run_load(base_url, args.warmup_requests, args.concurrency, args.seed + 1, args.request_deadline))
        asyncio.run(wait_kv_free(base_url, 30))
        rss_warm = rss_kib(process.pid)
        started = time.monotonic()
        results = asyncio.run(run_load(base_url, args.num_requests, args.concurrency, args.seed,
                                       args.request_deadline))
        elapsed = time.monotonic() - started
        kv_end = asyncio.run(wait_kv_free(base_url, 30))
        rss_end = rss_kib(process.pid)
    finally:
        process.terminate()
        process.wait(60)
    print_table(results, elapsed, rss_warm, rss_end, kv_end)
    failures = [f"{kind}: {outcome}" for kind, _, outcome, _ in results if outcome.startswith(("bad", "hang"))]
    failures += [f"KV not free at the end: usage/running {kv_end}"] if kv_end != (0.0, 0.0) else []
    failures += [f"RSS grew {100 * (rss_end - rss_warm) / rss_warm:.1f}% (> 10%)"] if rss_end > 1.1 * rss_warm else []
    failures += [f"server exit status {process.returncode} after SIGTERM"] if process.returncode != 0 else []
    for failure in Counter(failures).most_common(20):
        print("FAIL", *failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
