"""Fixtures for the app tests: a FakeEngineClient with AsyncEngineClient's interface over the REAL
Frontend of the tiny qwen2_5_vl checkpoint (real tokenizer, chat template, image processor), whose
"engine" replies with a scripted text, token by token. The script is the oracle: whatever the
engine produced must reach the HTTP client unchanged (text, token counts, finish reasons).
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
from typing import Callable

import httpx
import pytest
from litestar.testing import TestClient
from transformers import AutoConfig

from app.server_config import ServerConfig
from app.server import create_app
from engine.config_loader import create_engine_config
from engine.frontend import Frontend
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.protocol import SchedulerStats
from vision.limits import MultiModalLimits

MAX_MODEL_LEN = 2048
LIMITS = {"image": 5, "video": 5}


def fake_logprobs(token_id: int, num_top: int, tokenizer) -> dict[int, Logprob]:
    """Sampled token: logprob -0.5, rank 1; then num_top others with -1 - j (ranks 2..)."""
    position = {token_id: Logprob(-0.5, 1, tokenizer.decode([token_id]))}
    for j in range(num_top):
        other = (token_id + 1 + j) % 1000
        position[other] = Logprob(-1.0 - j, j + 2, tokenizer.decode([other]))
    return position


class FakeEngineClient:
    def __init__(self, frontend: Frontend, reply: Callable[[object], str] = lambda request: "Hello there, friend.",
                 delay_s: float = 0.0):
        self.frontend, self.reply, self.delay_s = frontend, reply, delay_s
        self.dead_error: str | None = None
        self.stats = SchedulerStats(num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.25,
                                    num_total_blocks=100, num_free_blocks=75)
        self.requests, self.aborted, self.finished = [], [], []

    def is_healthy(self) -> bool:
        return self.dead_error is None

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        pass

    def reply_ids(self, request) -> tuple[list[int], str]:
        ids = self.frontend.tokenizer.encode(self.reply(request), add_special_tokens=False)
        max_tokens = request.sampling_params.max_tokens
        return (ids[:max_tokens], "length") if len(ids) > max_tokens else (ids, "stop")

    async def generate(self, request, *, prompt: str | None = None):
        self.requests.append(request)
        ids, finish = self.reply_ids(request)
        params, tokenizer = request.sampling_params, self.frontend.tokenizer
        count = lambda modality: sum(i.placeholder.length for i in request.mm_items if i.modality == modality)  # noqa
        for n in range(1, len(ids) + 1):
            await asyncio.sleep(self.delay_s)
            logprobs = None
            if params.logprobs is not None:
                logprobs = [fake_logprobs(t, params.logprobs, tokenizer) for t in ids[:n]]
            outputs = [CompletionOutput(index=i, text=tokenizer.decode(ids[:n]), token_ids=ids[:n],
                                        cumulative_logprob=None, logprobs=logprobs,
                                        finish_reason=finish if n == len(ids) else None)
                       for i in range(params.n)]
            yield RequestOutput(request_id=request.req_id, prompt=prompt, prompt_token_ids=request.prompt_token_ids,
                                prompt_logprobs=None, outputs=outputs, finished=n == len(ids),
                                num_image_tokens=count("image"), num_video_tokens=count("video"))
        self.finished.append(request.req_id)


@pytest.fixture(scope="session")
def vl_frontend(tiny_model_dir) -> Frontend:
    """The real Frontend of the tiny qwen2_5_vl checkpoint. The config is built from the qwen2
    checkpoint and pointed at the VL one, so this works whether or not the VL model class is
    registered (the fake engine never loads weights)."""
    text_config = create_engine_config(model=str(tiny_model_dir("qwen2")), max_model_len=MAX_MODEL_LEN,
                                      limit_mm_per_prompt=LIMITS)
    path = str(tiny_model_dir("qwen2_5_vl"))
    model_config = dataclasses.replace(text_config.model_config, model=path, path=path, tokenizer=path,
                                       hf_config=AutoConfig.from_pretrained(path),
                                       architecture="Qwen2_5_VLForConditionalGeneration")
    return Frontend(text_config.replace(model_config=model_config))


def server_config(**changes) -> ServerConfig:
    fields = dict(model="tiny-vl", served_model_names=("tiny-vl", "alias"), limits=MultiModalLimits.parse(LIMITS),
                  enable_auto_tool_choice=True, tool_call_parser="hermes", disable_log_stats=True)
    return ServerConfig(**{**fields, **changes})


@pytest.fixture
def make_client(vl_frontend):
    """make_client(reply=..., **server_config changes) -> (TestClient, FakeEngineClient)."""
    opened = []

    def make(reply=None, delay_s: float = 0.0, **changes):
        fake = FakeEngineClient(vl_frontend, reply or (lambda request: "Hello there, friend."), delay_s)
        client = TestClient(app=create_app({}, server_config(**changes), client=fake))
        client.__enter__()
        opened.append(client)
        return client, fake

    yield make
    for client in opened:
        client.__exit__(None, None, None)


class UvicornThread:
    """A real uvicorn server on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app):
        import socket
        import threading

        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "UvicornThread":
        import time

        self.thread.start()
        deadline = time.monotonic() + 600
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def wait_healthy(base_url: str, process: subprocess.Popen, timeout_s: float = 300) -> None:
    """Polls /health of a `python -m app` child until 200; fails with its stderr if it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become healthy")
