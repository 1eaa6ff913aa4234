"""Killing the engine-core process under load: `python -m app` (tiny qwen2) serves 8 concurrent
long streams; SIGKILL its engine child. /health must answer 503 within a second, every client
must get an error at once (an error event in its stream, or a 503), new requests a 503, and the
server must exit non-zero (1) on its own so a service manager restarts it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.app.conftest import wait_healthy
from tests.security.conftest import free_port


def engine_child_pid(server_pid: int) -> int:
    """The spawned engine-core child (multiprocessing's spawn_main; not the resource tracker)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server_pid and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            return int(entry.name)
    raise AssertionError("no engine-core child process found")


async def stream_until_end(client: httpx.AsyncClient, started: asyncio.Event) -> tuple[str, float]:
    """-> (how the stream ended: 'error' | 'done' | 'http <status>', monotonic time it ended)."""
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
    ending = "cut"
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return f"http {response.status_code}", time.monotonic()
            async for line in response.aiter_lines():
                started.set()
                if line.startswith('data: {"error"'):
                    ending = "error"
                elif line == "data: [DONE]" and ending != "error":
                    ending = "done"
    except httpx.HTTPError:
        pass
    return ending, time.monotonic()


def test_killing_the_engine_under_load(tiny_model_dir):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "--model", str(tiny_model_dir("qwen2")), "--port", str(port), "--host",
         "127.0.0.1", "--served-model-name", "tiny", "--max-model-len", "256", "--num-gpu-blocks-override", "64",
         "--device", "cpu", "--disable-log-stats", "--disable-log-requests"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, process)
        endings, killed_at, health_at, new_status = asyncio.run(kill_under_load(base_url, process.pid))
        assert process.wait(30) == 1
    finally:
        if process.poll() is None:
            process.kill()
    assert health_at - killed_at < 1.0
    assert new_status == 503
    assert all(ending in ("error", "cut", "http 503") for ending, _ in endings), endings
    assert max(ended for _, ended in endings) - killed_at < 2.0, [ended - killed_at for _, ended in endings]


async def kill_under_load(base_url: str, server_pid: int):
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        started = asyncio.Event()
        streams = [asyncio.ensure_future(stream_until_end(client, started)) for _ in range(8)]
        await asyncio.wait_for(started.wait(), 60)
        os.kill(engine_child_pid(server_pid), signal.SIGKILL)
        killed_at = time.monotonic()
        while (await client.get("/health")).status_code != 503:
            await asyncio.sleep(0.01)
        health_at = time.monotonic()
        try:
            new_status = (await client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})).status_code
        except httpx.HTTPError:  # the server may already be on its way out
            new_status = 503
        endings = await asyncio.gather(*streams)
    return endings, killed_at, health_at, new_status
