"""`python -m app --model ...` as a real process: it starts, serves, and on SIGTERM finishes the
in-flight stream (drain), then exits 0. A start-up error (unsupported flag value) exits 2 at once."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.app.conftest import wait_healthy
from tests.security.conftest import free_port


def stream_completion(base_url: str, events: list, first_event: threading.Event, max_tokens: int = 24) -> None:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=120) as response:
        events.append(response.status_code)
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
                first_event.set()


def test_sigterm_drains_the_stream_and_exits_zero(tiny_model_dir):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "--model", str(tiny_model_dir("qwen2")), "--port", str(port), "--host",
         "127.0.0.1", "--served-model-name", "tiny", "--max-model-len", "256", "--num-gpu-blocks-override", "64",
         "--device", "cpu", "--disable-log-stats"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, process)
        events, first_event = [], threading.Event()
        reader = threading.Thread(target=stream_completion, args=(base_url, events, first_event))
        reader.start()
        assert first_event.wait(60)
        process.send_signal(signal.SIGTERM)
        reader.join(120)
        assert process.wait(120) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert events[0] == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[1:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert sum(1 for c in chunks for choice in c["choices"] if choice["text"]) > 1


def test_sigterm_to_the_process_group_drains_and_leaves_nothing_behind(tiny_model_dir):
    """systemd's `stop`: SIGTERM to every process of the group (server, engine core, resource
    tracker) while a 200-token request streams. The request completes, the server exits 0, no
    process of the group is left and nothing leaked (the resource tracker would say so)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "--model", str(tiny_model_dir("qwen2")), "--port", str(port), "--host",
         "127.0.0.1", "--served-model-name", "tiny", "--max-model-len", "256", "--num-gpu-blocks-override", "64",
         "--device", "cpu", "--disable-log-stats", "--drain-timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, process)
        events, first_event = [], threading.Event()
        reader = threading.Thread(target=stream_completion, args=(base_url, events, first_event, 200))
        reader.start()
        assert first_event.wait(60)
        os.killpg(process.pid, signal.SIGTERM)
        reader.join(120)
        status = process.wait(120)
        stderr = process.stderr.read()
        assert status == 0, stderr
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert events[0] == 200 and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[1:-1]]
    assert sum(len(choice["text"]) > 0 for c in chunks for choice in c["choices"]) > 100
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert "resource_tracker" not in stderr and "leaked" not in stderr, stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the core and the resource tracker leave after the server
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("a process of the server's group outlived it")


def test_unsupported_flag_value_fails_at_start(tiny_model_dir):
    result = subprocess.run([sys.executable, "-m", "app", "--model", str(tiny_model_dir("qwen2")),
                             "--quantization", "awq"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--quantization 'awq'" in result.stderr and "Traceback" not in result.stderr
