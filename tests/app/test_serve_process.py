"""`python -m app --model ...` as a real process: it starts, serves, and on SIGTERM finishes the
in-flight stream (drain), then exits 0. A start-up error (unsupported flag value) exits 2 at once."""

import json
import signal
import subprocess
import sys
import threading

import httpx

from tests.app.conftest import wait_healthy
from tests.security.conftest import free_port


def stream_completion(base_url: str, events: list, first_event: threading.Event) -> None:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 24, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=120) as response:
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
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert sum(1 for c in chunks for choice in c["choices"] if choice["text"]) > 1


def test_unsupported_flag_value_fails_at_start(tiny_model_dir):
    result = subprocess.run([sys.executable, "-m", "app", "--model", str(tiny_model_dir("qwen2")),
                             "--quantization", "awq"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--quantization 'awq'" in result.stderr and "Traceback" not in result.stderr
