"""The image chat, video and tool-calling samples (samples/clients/) against a real server on the tiny
Qwen3-VL (parsed by the real CLI, engine on the CPU in float32). Oracle: transformers' greedy generation
(tests/reference.py) for the same messages rendered with the checkpoint's chat template; for the video,
transformers decodes the file with its own PyAV reader and samples it with Qwen3VLVideoProcessor's rule,
so the frames, their timestamps and the answer are all checked."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import parse_serve_args
from app.server import create_app
from reference import RefVideo, hf_generate
from tests.app.conftest import UvicornThread
from vision.image import decode_image

REPO = Path(__file__).resolve().parents[2]
CLIENTS = REPO / "samples" / "clients"
MAX_TOKENS = 8
FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "2048", "--num-gpu-blocks-override", "256",
         "--limit-mm-per-prompt", '{"image": 2, "video": 1}', "--enable-auto-tool-choice",
         "--tool-call-parser", "hermes", "--served-model-name", "tiny-qwen3-vl"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("qwen3_vl"))


@pytest.fixture(scope="module")
def api(model_dir):
    engine_kwargs, config = parse_serve_args([model_dir, *FLAGS])
    with UvicornThread(create_app(engine_kwargs, config)) as server:
        yield server.base_url + "/v1"


def run_script(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(CLIENTS / name), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def reference_text(model_dir: str, content: list[dict], max_tokens: int = MAX_TOKENS, tools=None) -> str:
    from reference import RefRequest

    request = RefRequest(messages=[{"role": "user", "content": content}], tools=tools)
    [ref] = hf_generate(model_dir, [request], max_tokens)
    return ref.text


def test_image_chat_sample(api, model_dir, media_dir):
    image = media_dir / "rgb.png"
    out = run_script("chat_image_base64.py", "--base-url", api, "--image", str(image), "--max-tokens", str(MAX_TOKENS))
    answer, usage = out.rsplit("\n[usage] ", 1)
    expected = reference_text(model_dir, [{"type": "image", "image": decode_image(image.read_bytes())},
                                          {"type": "text", "text": "What is in this image?"}])
    assert answer == expected
    assert "'image_tokens': " in usage and "'image_tokens': 0" not in usage


def test_video_sample(api, model_dir, media_dir):
    from transformers import AutoProcessor
    from transformers.video_utils import load_video

    video = media_dir / "h264.mp4"
    out = run_script("chat_video.py", "--base-url", api, "--video", str(video), "--max-tokens", str(MAX_TOKENS))
    answer, tokens = out.rsplit("\n[video tokens] ", 1)
    sampler = AutoProcessor.from_pretrained(model_dir).video_processor.sample_frames
    frames, metadata = load_video(str(video), backend="pyav", sample_indices_fn=sampler)
    expected = reference_text(model_dir, [
        {"type": "video", "video": RefVideo(frames, metadata.fps, tuple(int(i) for i in metadata.frames_indices))},
        {"type": "text", "text": "What happens in this video?"}])
    assert answer == expected and int(tokens) > 0


def test_tool_calling_sample(api, model_dir):
    spec = importlib.util.spec_from_file_location("tool_calling_sample", CLIENTS / "tool_calling.py")
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    out = run_script("tool_calling.py", "--base-url", api, "--city", "Paris")
    expected = reference_text(model_dir, [{"type": "text", "text": "What is the weather in Paris?"}], 128,
                              tools=sample.TOOLS)
    # Random weights write no <tool_call>: the sample prints the plain answer, which must be transformers'
    # (the tools are rendered into the prompt exactly as the request sent them, key order included).
    assert out in (f"[finish_reason] stop\n[no tool call] {expected}\n",
                   f"[finish_reason] length\n[no tool call] {expected}\n")
