"""/v1/completions, /v1/models, /tokenize, /detokenize, /health, /version, /metrics, the API-key
guard and client-disconnect aborts, through the app with the FakeEngineClient (its scripted reply
and the real tokenizer are the oracles)."""

import json
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.server import create_app
from tests.app.conftest import FakeEngineClient, MAX_MODEL_LEN, UvicornThread, server_config
from tests.app.test_chat_fake import image_part, png_bytes, sse_events

REPLY = "Hello there, friend."


def test_completions_text_token_and_batched_prompts(make_client, vl_frontend):
    client, fake = make_client()
    tokenizer = vl_frontend.tokenizer
    body = client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 50}).json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == REPLY
    assert fake.requests[-1].prompt_token_ids == tokenizer.encode("Once upon")
    ids = tokenizer.encode("a b c")
    body = client.post("/v1/completions", json={"prompt": [ids, ids[:1]], "n": 2, "max_tokens": 2,
                                                "echo": True}).json()
    first_two = tokenizer.decode(tokenizer.encode(REPLY, add_special_tokens=False)[:2])
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [tokenizer.decode(ids) + first_two] * 2 + [
        tokenizer.decode(ids[:1]) + first_two] * 2
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == len(ids) + 1 and body["usage"]["completion_tokens"] == 8


def test_completions_logprobs_and_streaming(make_client, vl_frontend):
    client, _ = make_client()
    body = client.post("/v1/completions", json={"prompt": "x", "logprobs": 1, "max_tokens": 2}).json()
    logprobs = body["choices"][0]["logprobs"]
    ids = vl_frontend.tokenizer.encode(REPLY, add_special_tokens=False)[:2]
    tokens = [vl_frontend.tokenizer.decode([t]) for t in ids]
    assert logprobs["tokens"] == tokens and logprobs["token_logprobs"] == [-0.5, -0.5]
    assert logprobs["text_offset"] == [0, len(tokens[0])]
    assert [list(top.values()) for top in logprobs["top_logprobs"]] == [[-0.5], [-0.5]]
    events = sse_events(client.post("/v1/completions", json={"prompt": ["a", "b"], "stream": True, "max_tokens": 50,
                                                             "stream_options": {"include_usage": True}}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for index in (0, 1):
        assert "".join(c["text"] for ch in chunks for c in ch["choices"] if c["index"] == index) == REPLY
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 2


def test_completions_refusals(make_client):
    client, _ = make_client()
    for payload, needle in [({"prompt": "x", "suffix": "y"}, "suffix"), ({"prompt": ["a", 1]}, "prompt"),
                            ({"prompt": [10 ** 10]}, "prompt"), ({"prompt": "x", "logprobs": 21}, "logprobs"),
                            ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"),
                            ({"prompt": "x", "logit_bias": {"a": 1.0}}, "logit_bias"),
                            ({"prompt": "x", "logit_bias": {"99999999": 1.0}}, "logit_bias"),
                            ({"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
                            ({"prompt": "x", "allowed_token_ids": [99999999]}, "allowed_token_ids")]:
        response = client.post("/v1/completions", json=payload)
        assert response.status_code == 400, (payload, response.text)
        assert needle in response.json()["error"]["message"] + str(response.json()["error"]["param"])


def test_models_list(make_client):
    client, _ = make_client()
    body = client.get("/v1/models").json()
    assert [m["id"] for m in body["data"]] == ["tiny-vl", "alias"]
    assert all(m["max_model_len"] == MAX_MODEL_LEN and m["owned_by"] == "vlserve" and m["root"] == "tiny-vl"
               for m in body["data"])


def test_tokenize_prompt_messages_with_image_and_detokenize(make_client, vl_frontend):
    client, fake = make_client()
    body = client.post("/tokenize", json={"prompt": "hello world"}).json()
    assert body["tokens"] == vl_frontend.tokenizer.encode("hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == MAX_MODEL_LEN
    messages = [{"role": "user", "content": [image_part(png_bytes(64, 64)), {"type": "text", "text": "hi"}]}]
    tokenized = client.post("/tokenize", json={"messages": messages}).json()
    chat = client.post("/v1/chat/completions", json={"messages": messages}).json()
    assert tokenized["tokens"] == fake.requests[-1].prompt_token_ids
    assert tokenized["count"] == chat["usage"]["prompt_tokens"]
    assert chat["usage"]["prompt_tokens_details"]["image_tokens"] > 0
    assert client.post("/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "hello world"}
    assert client.post("/detokenize", json={"tokens": [10 ** 8]}).status_code == 400
    assert client.post("/tokenize", json={}).status_code == 400


def test_api_key_guard(make_client):
    client, _ = make_client(api_keys=("sekret",))
    assert client.get("/v1/models").status_code == 401
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert client.post("/tokenize", json={"prompt": "x"}).status_code == 401
    assert client.get("/health").status_code == 200 and client.get("/version").status_code == 200


def test_health_version_and_dead_engine(make_client):
    client, fake = make_client()
    assert client.get("/version").json()["version"]
    fake.dead_error = "core process exited"
    health = client.get("/health")
    assert health.status_code == 503 and "core process exited" in health.json()["error"]["message"]
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 503


def test_metrics_parse_and_count_tokens(make_client):
    client, fake = make_client()
    body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).json()
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    value = lambda name: sum(s.value for s in families[name].samples if s.name.endswith(("_total", "")))  # noqa
    assert value("vlserve:prompt_tokens") == body["usage"]["prompt_tokens"]
    assert value("vlserve:generation_tokens") == body["usage"]["completion_tokens"]
    assert families["vlserve:num_requests_running"].samples[0].value == fake.stats.num_running_reqs
    assert families["vlserve:kv_cache_usage_perc"].samples[0].value == fake.stats.kv_cache_usage
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        count = [s for s in families["vlserve:" + name].samples if s.name.endswith("_count")]
        assert count[0].value == 1


def test_openapi_and_docs(make_client):
    client, _ = make_client()
    schema = client.get("/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/models" in schema["paths"]
    assert client.get("/docs").status_code == 200


def test_client_disconnect_aborts_the_request(vl_frontend):
    """A real server: the client hangs up mid-stream and mid-collect; both requests are aborted."""
    fake = FakeEngineClient(vl_frontend, lambda request: "word " * 200, delay_s=0.02)
    with UvicornThread(create_app({}, server_config(), client=fake)) as server:
        with httpx.Client(base_url=server.base_url) as http:
            with http.stream("POST", "/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": "x"}], "stream": True}) as response:
                next(response.iter_lines())
            request = threading.Thread(target=lambda: _post_and_hang_up(server.base_url), daemon=True)
            request.start()
            request.join()
            deadline = time.monotonic() + 10
            while len(fake.aborted) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
    assert len(fake.aborted) == 2 and not set(fake.aborted) & set(fake.finished)


def _post_and_hang_up(base_url: str) -> None:
    try:
        httpx.post(base_url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                   timeout=0.5)
    except httpx.TimeoutException:
        pass


def test_engine_errors_map_to_400_and_503(make_client):
    from engine.client import EngineDeadError

    client, fake = make_client()
    original = fake.generate

    async def failing_request(request, *, prompt=None):
        async for output in original(request, prompt=prompt):
            output.error, output.finished = "the video could not be processed", True
            yield output
            return

    fake.generate = failing_request
    payload = {"messages": [{"role": "user", "content": "x"}]}
    for stream in (False, True):
        response = client.post("/v1/chat/completions", json={**payload, "stream": stream})
        assert response.status_code == 400 and "could not be processed" in response.json()["error"]["message"]

    async def dying_engine(request, *, prompt=None):
        fake.dead_error = "core process exited with code -9"
        raise EngineDeadError(fake.dead_error)
        yield  # pragma: no cover - makes this an async generator

    fake.generate = dying_engine
    response = client.post("/v1/chat/completions", json=payload)
    assert response.status_code == 503 and "code -9" in response.json()["error"]["message"]


def test_local_files_only_under_allowed_path(make_client, media_dir):
    url = (media_dir / "rgb.png").as_uri()
    payload = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    refused, _ = make_client()
    response = refused.post("/v1/chat/completions", json=payload)
    assert response.status_code == 400 and str(media_dir) not in response.json()["error"]["message"]
    allowed, fake = make_client(allowed_local_media_path=str(media_dir))
    response = allowed.post("/v1/chat/completions", json=payload)
    assert response.status_code == 200 and response.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0


def test_startup_summary_request_line_and_throughput_log(make_client, monkeypatch, caplog):
    import logging

    import app.server

    monkeypatch.setattr(app.server, "THROUGHPUT_LOG_INTERVAL_S", 0.05)
    with caplog.at_level(logging.INFO):
        client, fake = make_client(disable_log_stats=False, max_log_len=5)
        body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).json()
        time.sleep(0.3)
    text = caplog.text
    assert "qwen2_5_vl as tiny-vl, alias | dtype float32 | device cpu" in text and "per prompt: image 5, video 5" in text
    request_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(body["id"]))
    assert f"prompt_tokens={body['usage']['prompt_tokens']}" in request_line and "prompt='<|im_" in request_line
    assert "generation throughput" in text and "KV cache usage 25.0%" in text


def test_request_log_can_be_disabled(make_client, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        client, _ = make_client(disable_log_requests=True)
        body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).json()
    assert body["id"] not in caplog.text


def test_add_special_tokens_reaches_the_tokenizer(make_client, vl_frontend, monkeypatch):
    """vLLM's add_special_tokens: completions default true, chat default false (the template writes
    them); either can be flipped per request."""
    seen = []
    make_request = vl_frontend.make_request

    def spy(*args, **kwargs):
        seen.append(kwargs["add_special_tokens"])
        return make_request(*args, **kwargs)

    monkeypatch.setattr(vl_frontend, "make_request", spy)
    client, _ = make_client()
    for extra in ({}, {"add_special_tokens": False}):
        assert client.post("/v1/completions", json={"prompt": "x", **extra}).status_code == 200
    for extra in ({}, {"add_special_tokens": True}):
        assert client.post("/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "x"}], **extra}).status_code == 200
    assert seen == [True, False, False, True]
