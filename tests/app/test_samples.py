"""Every client sample and the eval script run against a real uvicorn server with the
FakeEngineClient (its scripted replies are the oracle for what the scripts must print)."""

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app.server import create_app
from tests.app.conftest import FakeEngineClient, UvicornThread, server_config
from tests.app.test_chat_fake import TOOL_REPLY

REPO = Path(__file__).resolve().parents[2]
CLIENTS = REPO / "samples" / "clients"
ANSWER = "Yes, it is."


def scripted_reply(frontend, request) -> str:
    prompt = frontend.tokenizer.decode(request.prompt_token_ids)
    if "What is the weather in" in prompt and '"temperature"' not in prompt:
        return TOOL_REPLY
    return ANSWER


@pytest.fixture(scope="module")
def media_server(media_dir):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def api(vl_frontend):
    fake = FakeEngineClient(vl_frontend, functools.partial(scripted_reply, vl_frontend))
    config = server_config(allowed_media_domains=("127.0.0.1",))
    with UvicornThread(create_app({}, config, client=fake)) as server:
        yield server.base_url + "/v1"


def run_script(path: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_image_samples(api, media_dir, media_server):
    out = run_script(CLIENTS / "chat_image_base64.py", "--base-url", api, "--image", str(media_dir / "rgb.png"))
    assert out.stdout.splitlines()[0] == ANSWER and "'image_tokens':" in out.stdout
    out = run_script(CLIENTS / "chat_image_url.py", "--base-url", api, "--url", media_server + "/gray.png",
                     "--detail", "low")
    assert out.stdout.strip() == ANSWER


def test_video_streaming_and_determinism_samples(api, media_dir):
    out = run_script(CLIENTS / "chat_video.py", "--base-url", api, "--video", str(media_dir / "h264.mp4"))
    lines = out.stdout.splitlines()
    assert lines[0] == ANSWER and int(lines[1].split()[-1]) > 0
    out = run_script(CLIENTS / "chat_streaming.py", "--base-url", api, "--prompt", "hi")
    assert out.stdout.startswith(ANSWER + "\n[usage] prompt=")
    out = run_script(CLIENTS / "determinism_check.py", "--base-url", api, "--image", str(media_dir / "rgb.png"),
                     "-n", "5")
    assert "deterministic: 5 identical answers" in out.stdout


def test_tool_calling_sample(api):
    out = run_script(CLIENTS / "tool_calling.py", "--base-url", api, "--city", "Paris")
    lines = out.stdout.splitlines()
    assert lines[0] == "[finish_reason] tool_calls"
    assert lines[1].startswith('[tool call] get_weather({"city": "Paris", "unit": "C"}) -> {"city": "Paris"')
    assert lines[2] == ANSWER


def test_eval_script(api, media_dir, tmp_path):
    data = REPO / "samples" / "eval" / "orientation.jsonl"
    items = [json.loads(line) for line in data.read_text().splitlines()]
    output = tmp_path / "predictions.jsonl"
    out = run_script(REPO / "samples" / "eval" / "eval_vqa.py", "--data", str(data), "--media-dir", str(media_dir),
                     "--base-url", api, "--concurrency", "4", "--output", str(output))
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    expected_accuracy = sum(item["answer"] == "yes" for item in items) / len(items)
    assert summary["num_items"] == len(items) and summary["num_failures"] == 0
    assert summary["accuracy"] == pytest.approx(expected_accuracy) and summary["requests_per_s"] > 0
    assert len(output.read_text().splitlines()) == len(items)
    assert "eval" in out.stderr  # the progress bar


def test_eval_script_writes_outside_the_repository_by_default(api, media_dir, tmp_path):
    """Without --output the predictions go to the temporary directory (TMPDIR here), not the checkout."""
    data = REPO / "samples" / "eval" / "orientation.jsonl"
    result = subprocess.run([sys.executable, str(REPO / "samples" / "eval" / "eval_vqa.py"), "--data", str(data),
                             "--media-dir", str(media_dir), "--base-url", api],
                            capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    written = tmp_path / "vlserve-eval" / "predictions.jsonl"
    assert len(written.read_text().splitlines()) == len(data.read_text().splitlines())
    assert f"predictions: {written}" in result.stderr
