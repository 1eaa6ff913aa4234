"""End to end: a real uvicorn server on 127.0.0.1 (one per module) serving the tiny qwen2_5_vl on
the CPU through the real AsyncEngineClient, driven by the official `openai` client.

Oracles: the offline `engine.LLM` greedy output on the same messages (same tokens and text), transformers'
log-softmax of the prompt (echo with logprobs, prompt_logprobs), the prometheus_client parser, and the
server's own schema (schemathesis finds no 5xx)."""

import asyncio
import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from app.server import create_app
from engine import LLM, SamplingParams
from reference import hf_prompt_logprobs
from tests.app.conftest import UvicornThread, server_config

API_KEY = "e2e-key"
MAX_MODEL_LEN = 1024
MAX_TOKENS = 12
ENGINE_KWARGS = dict(max_model_len=MAX_MODEL_LEN, limit_mm_per_prompt={"image": 5, "video": 5}, device="cpu",
                     num_gpu_blocks_override=256, max_num_seqs=32)


def image_url(seed: int, size=(96, 72)) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


MESSAGES = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(0)}},
                                         {"type": "text", "text": "Describe the picture."}]}]


@pytest.fixture(scope="module")
def model_path(tiny_model_dir) -> str:
    return str(tiny_model_dir("qwen2_5_vl"))


@pytest.fixture(scope="module")
def server(model_path):
    config = server_config(model=model_path, served_model_names=("tiny-vl",), api_keys=(API_KEY,))
    with UvicornThread(create_app({"model": model_path, **ENGINE_KWARGS}, config)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline_output(model_path):
    llm = LLM(model_path, **ENGINE_KWARGS)
    [output] = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return output


def test_base64_image_chat_equals_offline_greedy(client, offline_output):
    response = client.chat.completions.create(model="tiny-vl", messages=MESSAGES, temperature=0,
                                              max_tokens=MAX_TOKENS)
    expected = offline_output.outputs[0]
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.prompt_tokens == len(offline_output.prompt_token_ids)
    details = response.usage.prompt_tokens_details.model_dump()
    assert details["image_tokens"] == offline_output.num_image_tokens > 0


def test_streaming_same_text_and_usage_chunk(client, offline_output):
    stream = client.chat.completions.create(model="tiny-vl", messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == offline_output.outputs[0].text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(offline_output.outputs[0].token_ids)


SCORED_PROMPT = [11, 250, 7, 99, 500, 3, 42]


@pytest.fixture(scope="module")
def hf_scored(model_path) -> list[dict[int, float] | None]:
    [per_position] = hf_prompt_logprobs(model_path, [SCORED_PROMPT], top_k=2)
    return per_position


def _assert_prompt_logprobs(logprobs: dict, hf_scored: list, tokens: list[int]) -> None:
    """logprobs (the completions shape) starts with the prompt: None first, then transformers' values."""
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for position, token_id in enumerate(tokens[1:], start=1):
        assert abs(logprobs["token_logprobs"][position] - hf_scored[position][token_id]) < 1e-4
        best = max(hf_scored[position].values())
        assert abs(max(logprobs["top_logprobs"][position].values()) - best) < 1e-4


def test_echo_with_max_tokens_0_scores_the_prompt(server, hf_scored, model_path):
    """lm-eval's loglikelihood request: the prompt alone comes back, with transformers' log-probs."""
    body = httpx.post(f"{server.base_url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "tiny-vl", "prompt": SCORED_PROMPT, "echo": True, "logprobs": 1,
                            "max_tokens": 0, "temperature": 0}).json()
    [choice] = body["choices"]
    assert choice["text"] == AutoTokenizer.from_pretrained(model_path).decode(SCORED_PROMPT)
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(SCORED_PROMPT)
    assert logprobs["text_offset"] == [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(len(SCORED_PROMPT))]
    _assert_prompt_logprobs(logprobs, hf_scored, SCORED_PROMPT)
    assert choice["finish_reason"] == "length" and body["usage"]["prompt_tokens"] == len(SCORED_PROMPT)
    assert choice["prompt_logprobs"][0] is None
    for position, token_id in enumerate(SCORED_PROMPT[1:], start=1):
        entry = choice["prompt_logprobs"][position][str(token_id)]
        assert abs(entry["logprob"] - hf_scored[position][token_id]) < 1e-4 and entry["rank"] >= 1


def test_echo_with_logprobs_streams_the_prompt_first(server, hf_scored):
    chunks = []
    with httpx.stream("POST", f"{server.base_url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "tiny-vl", "prompt": SCORED_PROMPT, "echo": True, "logprobs": 1,
                            "max_tokens": 3, "temperature": 0, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[len("data: "):])["choices"][0])
    first = chunks[0]["logprobs"]
    _assert_prompt_logprobs(first, hf_scored, SCORED_PROMPT)
    tokens = [t for chunk in chunks if chunk["logprobs"] for t in chunk["logprobs"]["tokens"]]
    assert len(tokens) == len(SCORED_PROMPT) + 3
    sent = 0   # vLLM's text_offset: the characters the choice sent before the chunk, then its tokens' lengths
    for chunk in chunks:
        if chunk["logprobs"]:
            lengths = [len(t) for t in chunk["logprobs"]["tokens"]]
            assert chunk["logprobs"]["text_offset"] == [sent + sum(lengths[:i]) for i in range(len(lengths))]
        sent += len(chunk["text"])


def test_prompt_logprobs_field_and_its_limits(server, hf_scored):
    def post(body):
        return httpx.post(f"{server.base_url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "tiny-vl", "prompt": SCORED_PROMPT, "temperature": 0, **body})

    [choice] = post({"max_tokens": 1, "prompt_logprobs": 2}).json()["choices"]
    assert choice["logprobs"] is None and choice["prompt_logprobs"][0] is None
    for position in range(1, len(SCORED_PROMPT)):
        entry = {int(k): v["logprob"] for k, v in choice["prompt_logprobs"][position].items()}
        assert set(entry) == set(hf_scored[position])   # the prompt token and transformers' top 2
        assert all(abs(entry[k] - hf_scored[position][k]) < 1e-4 for k in entry)
    assert post({"max_tokens": 0}).status_code == 400
    assert post({"max_tokens": 1, "prompt_logprobs": 1, "stream": True}).status_code == 400


TEXT_MESSAGES = [{"role": "user", "content": "Name three colours."}]


def test_chat_prompt_logprobs_match_transformers(server, model_path):
    """vLLM's chat extension: prompt_logprobs at the response's top level, per rendered prompt token."""
    body = httpx.post(f"{server.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "tiny-vl", "messages": TEXT_MESSAGES, "max_tokens": 1, "temperature": 0,
                            "prompt_logprobs": 2}).json()
    [hf] = hf_prompt_logprobs(model_path, [TEXT_MESSAGES], top_k=2)
    got = body["prompt_logprobs"]
    assert len(got) == len(hf) == body["usage"]["prompt_tokens"] and got[0] is None
    for position in range(1, len(hf)):
        entry = {int(k): v["logprob"] for k, v in got[position].items()}
        assert set(entry) == set(hf[position])
        assert all(abs(entry[k] - hf[position][k]) < 1e-4 for k in entry)


def test_chat_echo_puts_the_continued_message_first(server):
    """vLLM's chat echo: a final assistant message that the reply continues comes back before it,
    collected and streamed alike; a user message is not echoed."""
    def post(**body):
        return httpx.post(f"{server.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "tiny-vl", "max_tokens": 4, "temperature": 0, **body})

    prefix = [*TEXT_MESSAGES, {"role": "assistant", "content": "Red, "}]
    continued = dict(messages=prefix, add_generation_prompt=False, continue_final_message=True)
    plain = post(**continued).json()["choices"][0]["message"]["content"]
    echoed = post(**continued, echo=True).json()["choices"][0]["message"]["content"]
    assert echoed == "Red, " + plain
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "tiny-vl", "max_tokens": 4, "temperature": 0, "stream": True, "echo": True,
                            **continued}) as response:
        deltas = [json.loads(line[len("data: "):])["choices"][0]["delta"].get("content") or ""
                  for line in response.iter_lines() if line.startswith("data: {")]
    assert "".join(deltas) == echoed
    not_echoed = post(messages=TEXT_MESSAGES, echo=True).json()["choices"][0]["message"]["content"]
    assert not_echoed == post(messages=TEXT_MESSAGES).json()["choices"][0]["message"]["content"]
    assert post(messages=TEXT_MESSAGES, prompt_logprobs=1, stream=True).status_code == 400


def test_cache_salt_keeps_prefix_caches_apart(server):
    """vLLM's cache_salt: the same prompt under another salt shares no cached blocks; under the same
    salt it does (usage.prompt_tokens_details.cached_tokens)."""
    prompt = list(range(100, 180))   # five 16-token blocks

    def cached(salt):
        body = httpx.post(f"{server.base_url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "tiny-vl", "prompt": prompt, "max_tokens": 1, "cache_salt": salt}).json()
        return body["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("salt-a") == 0
    assert cached("salt-b") == 0
    assert cached("salt-a") >= 64


def test_priority_and_truncation_with_media_are_refused(server):
    def post(path, body):
        return httpx.post(f"{server.base_url}{path}", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "tiny-vl", "max_tokens": 1, **body})

    assert post("/v1/completions", {"prompt": "hi", "priority": 1}).status_code == 400
    assert post("/v1/chat/completions", {"messages": MESSAGES, "truncate_prompt_tokens": 8}).status_code == 400
    body = post("/v1/completions", {"prompt": list(range(100, 140)), "truncate_prompt_tokens": 8}).json()
    assert body["usage"]["prompt_tokens"] == 8


def test_echo_of_a_truncated_prompt_is_what_ran(server, model_path):
    """echo with truncate_prompt_tokens: the echoed text is the kept tokens, which the logprobs cover."""
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    body = httpx.post(f"{server.base_url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "tiny-vl", "prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 0,
                            "truncate_prompt_tokens": 5}).json()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    kept = tokenizer.encode(prompt)[-5:]
    [choice] = body["choices"]
    assert choice["text"] == tokenizer.decode(kept) and len(choice["logprobs"]["tokens"]) == 5


def test_return_token_ids(server, offline_output, model_path):
    """vLLM's return_token_ids: the prompt's token ids and the choice's, those of the offline engine on
    the same messages; with stream a 400 (not built)."""
    def post(path, body):
        return httpx.post(f"{server.base_url}{path}", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "tiny-vl", "temperature": 0, "return_token_ids": True, **body})

    chat = post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": MAX_TOKENS}).json()
    assert chat["prompt_token_ids"] == offline_output.prompt_token_ids
    assert chat["choices"][0]["token_ids"] == offline_output.outputs[0].token_ids
    prompt = list(range(100, 120))
    [choice] = post("/v1/completions", {"prompt": prompt, "max_tokens": 3}).json()["choices"]
    assert choice["prompt_token_ids"] == prompt and len(choice["token_ids"]) == 3
    assert AutoTokenizer.from_pretrained(model_path).decode(choice["token_ids"], skip_special_tokens=True) == choice["text"]
    assert post("/v1/completions", {"prompt": prompt, "stream": True}).status_code == 400


def test_six_images_is_a_400(client):
    content = [{"type": "image_url", "image_url": {"url": image_url(i)}} for i in range(6)]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny-vl", messages=[{"role": "user", "content": content}], max_tokens=2)
    assert error.value.status_code == 400 and "at most 5 image" in error.value.body["message"]


def test_twenty_identical_greedy_requests_agree(server):
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0) as aclient:
            calls = [aclient.chat.completions.create(model="tiny-vl", messages=MESSAGES, temperature=0,
                                                     max_tokens=MAX_TOKENS) for _ in range(20)]
            return [r.choices[0].message.content for r in await asyncio.gather(*calls)]

    texts = asyncio.run(run())
    assert len(texts) == 20 and len(set(texts)) == 1


def test_wrong_key_is_401(server):
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as error:
        bad.models.list()
    assert error.value.status_code == 401


def test_models_and_metrics(client, server):
    [card] = client.models.list().data
    assert card.id == "tiny-vl" and card.model_extra["max_model_len"] == MAX_MODEL_LEN
    text = httpx.get(server.base_url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    generated = sum(s.value for s in families["vlserve:generation_tokens"].samples if s.name.endswith("_total"))
    assert generated > 0 and "vlserve:kv_cache_usage_perc" in families
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_schemathesis_finds_no_5xx(server):
    schema = schemathesis.openapi.from_dict(httpx.get(server.base_url + "/openapi.json").json())
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            if isinstance(case.body, dict) and operation.path.endswith("completions"):
                case.body["max_tokens"] = 4  # bounded work per example; every other field is random
                case.body.pop("max_completion_tokens", None)
            response = case.call(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"})
            if response.status_code >= 500:
                failures.append((operation.label, case.body, response.status_code, response.text[:300]))

        check()
    assert failures == []
