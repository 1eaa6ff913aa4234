"""`vlserve serve ... --tensor-parallel-size 2` on the CPU (gloo), parsed by the real CLI, answers
the OpenAI requests of the server issue: a base64-image chat (plain and streamed) equal to the
single-rank offline greedy output, and /v1/models."""

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from app.cli import parse_serve_args
from app.server import create_app
from engine import LLM, SamplingParams
from tests.app.conftest import UvicornThread

FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-model-len", "512", "--num-gpu-blocks-override", "128",
         "--limit-mm-per-prompt", "image=2", "--served-model-name", "tiny-tp2"]


def _messages():
    pixels = np.random.default_rng(3).integers(0, 256, (72, 96, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Describe the picture."}]}]


@pytest.fixture(scope="module")
def model_path(tiny_model_dir) -> str:
    return str(tiny_model_dir("qwen2_5_vl"))


def test_tp2_server_answers_like_the_single_rank_engine(model_path):
    messages = _messages()
    engine_kwargs, _ = parse_serve_args([model_path, *FLAGS])
    llm = LLM(**engine_kwargs)
    [expected] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    del llm

    engine_kwargs, config = parse_serve_args([model_path, *FLAGS, "--tensor-parallel-size", "2"])
    assert engine_kwargs["tensor_parallel_size"] == 2
    with UvicornThread(create_app(engine_kwargs, config)) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-tp2"]
        reply = client.chat.completions.create(model="tiny-tp2", messages=messages, temperature=0, max_tokens=8)
        assert reply.choices[0].message.content == expected.outputs[0].text
        assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
        stream = client.chat.completions.create(model="tiny-tp2", messages=messages, temperature=0, max_tokens=8,
                                                stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == \
            expected.outputs[0].text
