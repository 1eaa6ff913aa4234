"""Hostile requests against the real server (tiny qwen2_5_vl, default network rules: no allow-list,
private addresses refused; file:// only under a temporary directory): bad JSON and types,
out-of-range sampling values, malformed content parts, HTTP-layer limits (413, 431), hostile
images and videos in data:/file: URLs, SSRF spellings of internal addresses, disconnects.

Each case asserts the status the issue specifies and the OpenAI error JSON (no leaks); the last
test checks that the server is healthy, every KV block is free, and greedy output is unchanged.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import httpx
import pytest

from app.server_config import ServerConfig
from tests.security.conftest import (ENGINE_KWARGS, ServerThread, assert_error, chat_body, data_url, image_part,
                                     png_bytes, video_part, wait_until_kv_free)
from vision.limits import MultiModalLimits

LONG_MAX_TOKENS = 4000  # ~10 s of decoding on a 2-core box: far longer than the 1 s client timeout
GREEDY = chat_body(image_part(data_url(png_bytes(56, 56, seed=1))), max_tokens=8)


@pytest.fixture(scope="module")
def local_media(tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(png_bytes(32, 32))
    (root / "ok.png").write_bytes(png_bytes(32, 32))
    os.symlink(outside / "secret.png", root / "link.png")
    return root, outside


@pytest.fixture(scope="module")
def server(tiny_model_dir, local_media):
    model = str(tiny_model_dir("qwen2_5_vl"))
    config = ServerConfig(model=model, served_model_names=("tiny-vl",), disable_log_stats=True,
                          disable_log_requests=True, limits=MultiModalLimits.parse(ENGINE_KWARGS["limit_mm_per_prompt"]),
                          allowed_local_media_path=str(local_media[0]))
    # Room for LONG_MAX_TOKENS: the disconnect test needs a request that outlasts its client's timeout.
    engine_kwargs = {"model": model, **ENGINE_KWARGS, "max_model_len": 4096, "num_gpu_blocks_override": 4096 // 16 + 8}
    with ServerThread(engine_kwargs, config) as running:
        yield running


@pytest.fixture(scope="module")
def greedy_before(http):
    response = http.post("/v1/chat/completions", json=GREEDY)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def chat(http, body: dict) -> httpx.Response:
    return http.post("/v1/chat/completions", json=body)


# ---------------------------------------------------------------- request shape and values

def test_invalid_json_is_a_400(http, greedy_before):
    response = http.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert_error(response, 400)


@pytest.mark.parametrize("body, field", [
    ([1, 2, 3], None),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": ["just a string"]}]}, "content"),
    ({"messages": [{"role": "user", "content": [{"type": "audio_blob", "data": "x"}]}]}, "content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "http://x/y.png"}]}]},
     "image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url"),
])
def test_wrong_types_and_malformed_parts_are_400s_naming_the_field(http, body, field):
    error = assert_error(chat(http, body), 400)
    if field:
        assert field in error["message"]


@pytest.mark.parametrize("fields, name", [
    ({"n": 100000}, "n"),
    ({"logprobs": True, "top_logprobs": 1000}, "top_logprobs"),
    ({"stop": [f"s{i}" for i in range(10000)]}, "stop"),
    ({"stop": "x" * 10000}, "stop"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": 1e9}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 2}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"seed": 2 ** 64}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2 ** 40}, "max_tokens"),
    ({"max_tokens": 5000}, "context length"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"chat_template": "{{ 7 * 7 }}"}, "--trust-request-chat-template"),
])
def test_out_of_range_sampling_values_are_400s(http, fields, name):
    body = {"model": "tiny-vl", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    assert_error(chat(http, body), 400, name)


def test_completions_logprobs_and_token_ids_are_bounded(http):
    base = {"model": "tiny-vl", "max_tokens": 2}
    assert_error(http.post("/v1/completions", json={**base, "prompt": "hi", "logprobs": 1000}), 400, "logprobs")
    assert_error(http.post("/v1/completions", json={**base, "prompt": [10 ** 9]}), 400)
    assert_error(http.post("/v1/completions", json={**base, "prompt": [5, 6], "n": 100000}), 400, "n")


def test_unknown_model_is_a_404(http):
    assert_error(chat(http, {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}), 404, "gpt-9")


def test_audio_parts_are_refused(http):
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    assert_error(chat(http, chat_body(part)), 400, "input_audio")


def test_too_many_images_is_a_400_before_any_fetch(http):
    parts = [image_part("http://10.255.255.1/never-fetched.png")] * 5
    started = time.monotonic()
    assert_error(chat(http, chat_body(*parts)), 400, "at most 4 image")
    assert time.monotonic() - started < 2


# ---------------------------------------------------------------- HTTP layer

def test_a_200_mb_body_is_a_413(server):
    payload = b'{"model": "tiny-vl", "messages": [{"role": "user", "content": [{"type": "image_url", ' \
              b'"image_url": {"url": "data:image/png;base64,' + b"A" * (200 * 1024 * 1024) + b'"}}]}]}'
    try:
        response = httpx.post(server.base_url + "/v1/chat/completions", content=payload, timeout=60,
                              headers={"content-type": "application/json"})
    except httpx.WriteError:  # the server answered and closed before the upload ended: read the answer
        response = raw_response(server.port, len(payload))
    assert_error(response, 413)


def raw_response(port: int, content_length: int) -> httpx.Response:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n{" % content_length)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return httpx.Response(int(head.split()[1]), content=body, headers={"content-type": "application/json"})


def test_a_64_kb_header_is_a_431(server):
    response = httpx.get(server.base_url + "/v1/models", headers={"x-padding": "a" * 65536})
    assert_error(response, 431, "headers are too large")


# ---------------------------------------------------------------- hostile images

def crafted_png_header(width: int, height: int) -> bytes:
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("url, words", [
    ("data:image/png;base64,!!!not*base64!!!", ["base64"]),
    ("data:image/png;base64,", ["empty"]),
    ("data:image/png,", ["empty"]),
    ("data:image/png;base64", ["malformed data url"]),
    (data_url(png_bytes(64, 64)[:200]), ["corrupt or truncated"]),
    (data_url(b"this is plain text, not a picture " * 10), ["not a supported image"]),
    (data_url(crafted_png_header(100_000, 100_000)), ["too large"]),
    (data_url(png_bytes(1, 10000)), ["aspect ratio"]),
    (data_url(png_bytes(10000, 1)), ["aspect ratio"]),
    ("ftp://example.com/a.png", ["unsupported media url"]),
    ("gopher://127.0.0.1:70/_x", ["unsupported media url"]),
])
def test_hostile_images_are_400s(http, url, words):
    started = time.monotonic()
    assert_error(chat(http, chat_body(image_part(url))), 400, *words)
    assert time.monotonic() - started < 10


def test_mp4_bytes_under_an_image_mime_type_are_a_400(http, media_dir):
    url = data_url((media_dir / "h264.mp4").read_bytes(), mime="image/jpeg")
    assert_error(chat(http, chat_body(image_part(url))), 400, "not a supported image")


@pytest.mark.parametrize("name_or_size", [(1, 1), (1, 7), (2, 300), "cmyk.jpg", "animated.gif", "gray16.png"])
def test_odd_but_valid_images_are_served(http, media_dir, name_or_size):
    if isinstance(name_or_size, tuple):
        data, mime = png_bytes(*name_or_size), "image/png"
    else:
        data, mime = (media_dir / name_or_size).read_bytes(), "image/" + name_or_size.rsplit(".", 1)[1]
    response = chat(http, chat_body(image_part(data_url(data, mime))))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0


# ---------------------------------------------------------------- hostile videos

def patched(data: bytes, box: bytes, offset: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(">I", out, data.index(box) + offset, value)
    return bytes(out)


@pytest.mark.parametrize("variant, words", [
    ("truncated", []),
    ("billion_frames", ["frame count"]),
    ("one_frame_per_1024_s", ["too long"]),
    ("random", ["not a supported video"]),
])
def test_hostile_videos_are_quick_400s(http, media_dir, variant, words):
    mp4 = (media_dir / "h264.mp4").read_bytes()
    data = {"truncated": mp4[: len(mp4) // 3],
            "billion_frames": patched(mp4, b"stts", 12, 10 ** 9),  # stts entry: 1e9 samples declared
            "one_frame_per_1024_s": patched(mp4, b"mdhd", 16, 1),  # timescale 1: frame rate 1/1024
            "random": os.urandom(4096)}[variant]
    started = time.monotonic()
    assert_error(chat(http, chat_body(video_part(data_url(data, "video/mp4")))), 400, *words)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("name", ["h264.mp4", "one-frame png"])
def test_a_valid_video_is_served(http, media_dir, name):
    """A PNG is a one-frame image sequence to FFmpeg: served as a one-frame video (vision/video.py)."""
    data = png_bytes(32, 32) if name == "one-frame png" else (media_dir / name).read_bytes()
    response = chat(http, chat_body(video_part(data_url(data, "video/mp4"))))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens_details"]["video_tokens"] > 0


# ---------------------------------------------------------------- local files and internal addresses

def test_file_urls_stay_in_the_allowed_directory(http, local_media):
    root, outside = local_media
    assert chat(http, chat_body(image_part(f"file://{root}/ok.png"))).status_code == 200
    for url in (f"file://{root}/../{outside.name}/secret.png", f"file://{root}/link.png",
                f"file://{root}/%2e%2e/{outside.name}/secret.png", "file:///etc/passwd"):
        assert_error(chat(http, chat_body(image_part(url))), 400, "outside the allowed")
    assert_error(chat(http, chat_body(image_part(f"file://evil.test{root}/ok.png"))), 400, "remote host")
    assert_error(chat(http, chat_body(image_part(f"file://{root}/missing.png"))), 400, "existing file")


@pytest.mark.parametrize("host", [
    "127.0.0.1", "[::1]", "2130706433", "0177.0.0.1", "0x7f000001", "127.1", "[::ffff:127.0.0.1]",
    "localhost", "169.254.169.254", "10.0.0.1", "192.168.1.1", "[fd00::1]", "0.0.0.0",
    "allowed.example.com@127.0.0.1",
])
def test_internal_addresses_are_refused_without_connecting(http, host):
    error = assert_error(chat(http, chat_body(image_part(f"http://{host}:9/latest/meta-data"))), 400)
    refusals = ("private or local network address", "could not resolve", "malformed media url")
    assert any(refusal in error["message"].lower() for refusal in refusals), error["message"]


# ---------------------------------------------------------------- disconnects, then the final checks

def test_disconnects_free_the_kv_cache_at_once(server, http):
    body = {"model": "tiny-vl", "messages": [{"role": "user", "content": "count"}], "max_tokens": LONG_MAX_TOKENS,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                break
    wait_until_kv_free(server.base_url, timeout_s=2)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
    wait_until_kv_free(server.base_url, timeout_s=2)


def test_after_the_suite_healthy_kv_free_and_same_greedy_output(server, http, greedy_before):
    assert http.get("/health").status_code == 200
    wait_until_kv_free(server.base_url)
    response = http.post("/v1/chat/completions", json=GREEDY)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == greedy_before
