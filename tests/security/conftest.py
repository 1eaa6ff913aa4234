"""Harness of the hostile-input suite: the REAL server (app.server.create_app + the uvicorn
settings of `serve`, h11 431 handling included) on the tiny qwen2_5_vl in a thread, a hostile
local media server on 127.0.0.1, media builders, and the checks every case shares.

Oracles: the OpenAI error shape and the expected status (what the issue specifies for each
input); transformers-free checks of internals: /metrics (KV usage 0 = every block free) and a
greedy request whose text must equal the one taken before the hostile cases.
"""

from __future__ import annotations

import base64
import http.server
import io
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.server import create_app, uvicorn_config

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE_KWARGS = dict(max_model_len=1024, limit_mm_per_prompt={"image": 4, "video": 2}, device="cpu",
                     num_gpu_blocks_override=128, max_num_seqs=8)
LEAK_PATTERNS = [re.compile(p) for p in (r"Traceback", r"File \"", r" object at 0x", r"site-packages",
                                         re.escape(str(REPO_ROOT)), r"/tmp/", r"\bself\.")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """The app under `serve`'s uvicorn settings, on 127.0.0.1:<free port>, in a daemon thread."""

    def __init__(self, engine_kwargs: dict, server_config):
        import uvicorn

        self.port = free_port()
        app = create_app(engine_kwargs, server_config)
        self.server = uvicorn.Server(uvicorn_config(app, server_config, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 300
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture(scope="module", name="http")  # not `def http`: that would shadow the http.server module
def http_client(server):
    """A client of the module's own `server` fixture."""
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    """The OpenAI error JSON with `status`; its message holds every word and leaks nothing."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    error = body["error"]
    assert set(body) == {"error"} and isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["code"] == status
    for word in words:
        assert word.lower() in error["message"].lower(), (word, error["message"])
    for pattern in LEAK_PATTERNS:
        assert not pattern.search(error["message"]), (pattern.pattern, error["message"])
    return error


def kv_usage_and_running(base_url: str) -> tuple[float, float]:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(base_url + "/metrics").text)}
    usage = families["vlserve:kv_cache_usage_perc"].samples[0].value
    running = families["vlserve:num_requests_running"].samples[0].value
    return usage, running


def wait_until_kv_free(base_url: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while kv_usage_and_running(base_url) != (0.0, 0.0):
        assert time.monotonic() < deadline, f"KV blocks still in use: {kv_usage_and_running(base_url)}"
        time.sleep(0.05)


def png_bytes(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def chat_body(*parts: dict, max_tokens: int = 2, **fields) -> dict:
    content = [*parts, {"type": "text", "text": "Describe."}]
    return {"model": "tiny-vl", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **fields}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


# ---------------------------------------------------------------- hostile media server


class MediaHandler(http.server.BaseHTTPRequestHandler):
    """/image.png, /slow (headers after a long pause), /drip (body never ends), /redirect?to=URL,
    /huge-declared (Content-Length 10 GB), /huge-streamed (no Content-Length, endless body)."""

    image = png_bytes(64, 48, seed=7)

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        try:
            if path == "/image.png":
                return self._send(200, self.image)
            if path == "/slow":
                time.sleep(5)
                return self._send(200, self.image)
            if path == "/redirect":
                self.send_response(302)
                self.send_header("Location", query.removeprefix("to="))
                self.send_header("Content-Length", "0")
                return self.end_headers()
            if path in ("/drip", "/huge-streamed", "/huge-declared"):
                return self._stream(path)
            self._send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, path: str) -> None:
        self.send_response(200)
        if path == "/huge-declared":
            self.send_header("Content-Length", str(10 ** 10))
        self.end_headers()
        chunk = b"\0" * 65536
        for _ in range(2000):
            self.wfile.write(chunk[:1] if path == "/drip" else chunk)
            self.wfile.flush()
            time.sleep(0.2 if path == "/drip" else 0)


class MediaServer:
    def __enter__(self) -> "MediaServer":
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MediaHandler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
