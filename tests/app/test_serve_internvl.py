"""The seed's InternVL deployment end to end: `vlserve serve <InternVL2.5 original layout>
--max-num-batched-tokens 8192` (no --trust-remote-code, as `vllm serve OpenGVLab/InternVL2_5-1B`
in the seed), parsed by the real CLI, on the tiny checkpoint, answering an OpenAI chat request with
a base64 image. Oracle: the offline LLM.chat greedy output."""

import base64
import io
import logging

import numpy as np
import openai
import pytest
from PIL import Image

from app.cli import parse_serve_args
from app.server import create_app
from engine import LLM, SamplingParams
from tests.app.conftest import UvicornThread

FLAGS = ["--max-num-batched-tokens", "8192", "--device", "cpu",
         "--max-model-len", "2048", "--num-gpu-blocks-override", "256", "--served-model-name", "internvl-tiny"]


def _image_url() -> str:
    pixels = np.random.default_rng(7).integers(0, 256, (80, 150, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


MESSAGES = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_url()}},
                                         {"type": "text", "text": "What is shown?"}]}]


@pytest.fixture(scope="module")
def model_path(tiny_model_dir) -> str:
    return str(tiny_model_dir("internvl_chat"))


@pytest.fixture(scope="module")
def server(model_path):
    engine_kwargs, config = parse_serve_args([model_path, *FLAGS])
    with UvicornThread(create_app(engine_kwargs, config)) as running:
        yield running


def test_chat_with_base64_image_matches_offline_greedy(server, model_path):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["internvl-tiny"]
    reply = client.chat.completions.create(model="internvl-tiny", messages=MESSAGES, temperature=0, max_tokens=10)

    engine_kwargs, _ = parse_serve_args([model_path, *FLAGS])
    llm = LLM(**engine_kwargs)
    [expected] = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    assert reply.choices[0].message.content == expected.outputs[0].text
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.prompt_tokens_details.model_dump()["image_tokens"] == expected.num_image_tokens > 0


def test_original_layout_loads_without_remote_code_and_the_flag_is_still_accepted(model_path, caplog):
    with caplog.at_level(logging.INFO, logger="vlserve.config"):
        from engine.config_loader import create_engine_config

        plain = create_engine_config(**parse_serve_args([model_path, "--device", "cpu"])[0])
    assert "no remote code from the checkpoint runs" in caplog.text
    flagged = create_engine_config(**parse_serve_args([model_path, "--device", "cpu", "--trust-remote-code"])[0])
    assert plain.model_config.architecture == flagged.model_config.architecture == "InternVLChatModel"
