"""Hostile media servers and overload against the real server (tiny qwen2_5_vl) with an allow-list
(`localhost` only), tight fetch limits, one running sequence, 3 waiting requests at most and a
1 s request timeout. A local HTTP server on 127.0.0.1 plays the hostile media host: slow headers,
a body that drips forever, redirects into blocked addresses, lying and endless bodies.

Each case asserts the status the issue specifies and the OpenAI error JSON; the last test checks
that the server is healthy, every KV block is free, and greedy output is unchanged.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from app.server_config import ServerConfig
from tests.security.conftest import (ENGINE_KWARGS, MediaServer, ServerThread, assert_error, chat_body, data_url,
                                     image_part, kv_usage_and_running, png_bytes, wait_until_kv_free)
from vision.limits import MultiModalLimits

FETCH_TIMEOUT_S = 1.5
REQUEST_TIMEOUT_S = 2.0
MAX_WAITING = 3
LONG_MAX_TOKENS = 4000  # far more steps than the test lasts; the test disconnects first


@pytest.fixture(scope="module")
def media():
    with MediaServer() as running:
        yield running


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    model = str(tiny_model_dir("qwen2_5_vl"))
    config = ServerConfig(model=model, served_model_names=("tiny-vl",), disable_log_stats=True,
                          disable_log_requests=True, limits=MultiModalLimits.parse(ENGINE_KWARGS["limit_mm_per_prompt"]),
                          allowed_media_domains=("localhost",), media_fetch_timeout_s=FETCH_TIMEOUT_S,
                          media_fetch_connect_timeout_s=1.0, max_media_bytes=256 * 1024, max_media_redirects=2,
                          max_waiting_requests=MAX_WAITING, request_timeout_s=REQUEST_TIMEOUT_S,
                          max_queued_media_bytes=400 * 1024)
    engine_kwargs = {"model": model, **ENGINE_KWARGS, "max_num_seqs": 1, "max_model_len": LONG_MAX_TOKENS + 64,
                     "num_gpu_blocks_override": (LONG_MAX_TOKENS + 64) // 16 + 8}
    with ServerThread(engine_kwargs, config) as running:
        yield running


@pytest.fixture(scope="module")
def greedy_body(media) -> dict:
    return chat_body(image_part(f"http://localhost:{media.port}/image.png"), max_tokens=8)


@pytest.fixture(scope="module")
def greedy_before(http, greedy_body):
    response = http.post("/v1/chat/completions", json=greedy_body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def chat_url(http, url: str) -> httpx.Response:
    return http.post("/v1/chat/completions", json=chat_body(image_part(url)))


def test_an_allowed_host_and_an_allowed_redirect_are_served(http, media, greedy_before):
    base = f"http://localhost:{media.port}"
    assert chat_url(http, f"{base}/redirect?to={base}/image.png").status_code == 200


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:{port}/image.png", "http://169.254.169.254/latest/meta-data/", "http://[::1]:{port}/image.png",
    "file:///etc/passwd", "data:image/png;base64,AAAA",
])
def test_redirects_to_blocked_targets_are_refused(http, media, target):
    base = f"http://localhost:{media.port}"
    url = f"{base}/redirect?to={target.format(port=media.port)}"
    error = assert_error(chat_url(http, url), 400)
    refusals = ("not allowed", "must be http(s)", "malformed url")
    assert any(refusal in error["message"].lower() for refusal in refusals), error["message"]


def test_a_redirect_loop_stops_after_the_cap(http, media):
    base = f"http://localhost:{media.port}"
    url = f"{base}/redirect?to={base}/redirect?to={base}/redirect?to={base}/image.png"
    assert_error(chat_url(http, url), 400, "too many redirects")


@pytest.mark.parametrize("url", [
    "http://localhost.evil.test:{port}/image.png", "http://localhost@127.0.0.1:{port}/image.png",
    "http://127.0.0.1:{port}#@localhost/image.png", "http://localhost:{port}@127.0.0.1:{port}/image.png",
    "http://LOCALHOST.:{port}/missing", "http://2130706433:{port}/image.png", "http://[::ffff:7f00:1]:{port}/x",
])
def test_hosts_that_only_look_allowed_are_refused(http, media, url):
    response = chat_url(http, url.format(port=media.port))
    if "LOCALHOST." in url:  # the same host, spelled differently: allowed, and its 404 is reported
        assert_error(response, 400, "HTTP 404")
        return
    error = assert_error(response, 400)
    assert "not allowed" in error["message"] or "malformed" in error["message"], error["message"]


def test_userinfo_tricks_are_judged_by_the_host_actually_connected_to(http, media):
    # The fetcher's own parser (httpx) reads `evil.test\` as userinfo and connects to localhost,
    # the allowed host: the check and the connection agree, whatever a browser would make of it.
    assert chat_url(http, f"http://evil.test\\@localhost:{media.port}/image.png").status_code == 200


@pytest.mark.parametrize("path, words", [
    ("/slow", ["timed out"]), ("/drip", ["timed out"]),
    ("/huge-declared", ["larger than"]), ("/huge-streamed", ["larger than"]),
])
def test_slow_and_oversized_media_hosts_are_cut_off(http, media, path, words):
    started = time.monotonic()
    assert_error(chat_url(http, f"http://localhost:{media.port}{path}"), 400, *words)
    assert time.monotonic() - started < FETCH_TIMEOUT_S + 3


def test_waiting_cap_and_request_timeout_answer_503(server, http):
    # The long request is a stream the test itself ends (by disconnecting), so it holds the one
    # running slot for as long as the test needs, however fast the engine decodes.
    long_body = {"model": "tiny-vl", "messages": [{"role": "user", "content": "go"}], "stream": True,
                 "max_tokens": LONG_MAX_TOKENS, "ignore_eos": True}
    started, stop, chunks = threading.Event(), threading.Event(), []

    def hold_the_engine() -> None:
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=long_body, timeout=120) as response:
            for line in response.iter_lines():
                chunks.append(line)
                started.set()
                if stop.is_set() or line == "data: [DONE]":
                    return

    runner = threading.Thread(target=hold_the_engine)
    runner.start()
    assert started.wait(30) and kv_usage_and_running(server.base_url)[1] == 1

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            body = {"model": "tiny-vl", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(8)))

    responses = asyncio.run(burst())
    assert "data: [DONE]" not in chunks, "the long request ended too early for this test to mean anything"
    stop.set()
    runner.join(60)
    messages = [assert_error(r, 503)["message"] for r in responses]
    assert sum("--max-waiting-requests" in m for m in messages) == 8 - MAX_WAITING, messages
    assert sum("--request-timeout" in m for m in messages) == MAX_WAITING, messages
    wait_until_kv_free(server.base_url)  # the disconnect aborted the long request and freed its blocks


def test_queued_media_bytes_cap_answers_503_before_fetching(server, media):
    big = data_url(png_bytes(250, 250, seed=3))  # ~250 KB of base64
    slow = image_part(f"http://localhost:{media.port}/slow")

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            first = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body(image_part(big), slow)))
            await asyncio.sleep(0.5)  # the first request is fetching /slow, holding its 250 KB
            second = await client.post("/v1/chat/completions", json=chat_body(image_part(big)))
            return await first, second

    first, second = asyncio.run(run())
    assert_error(second, 503, "--max-queued-media-bytes")
    assert_error(first, 400, "timed out")


def test_after_the_suite_healthy_kv_free_and_same_greedy_output(server, http, greedy_body, greedy_before):
    assert http.get("/health").status_code == 200
    wait_until_kv_free(server.base_url)
    response = http.post("/v1/chat/completions", json=greedy_body)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == greedy_before
