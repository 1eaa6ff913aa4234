"""vLLM's everyday flags that reach the HTTP server: TLS (--ssl-keyfile/--ssl-certfile), CORS
(--allowed-origins ...), --root-path, --response-role, --chat-template-content-format, and the
engine-side ones (--max-logprobs, --media-io-kwargs, --hf-overrides, --generation-config ...)
parsed from the command line or a --config YAML file. Oracles: the HTTP exchange itself (a TLS
handshake against the given certificate, CORS headers as the Fetch standard defines them) and
hand-written expectations."""

import ipaddress
import shutil
import ssl
import threading
import time

import httpx
import pytest

from app.cli import parse_serve_args
from app.server import create_app, uvicorn_config
from engine.chat_render import render_chat
from tests.app.conftest import FakeEngineClient, server_config

USER = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]


def test_engine_flags_map_to_engine_kwargs():
    engine, _ = parse_serve_args([
        "m", "--tokenizer", "tok", "--revision", "r1", "--tokenizer-revision", "r2", "--download-dir", "/d",
        "--max-logprobs", "50", "--no-enable-chunked-prefill", "--generation-config", "vllm",
        "--override-generation-config", '{"temperature": 0.5}', "--hf-overrides", '{"rope_theta": 1.0}',
        "--media-io-kwargs", '{"video": {"num_frames": 8}}', "--mm-processor-cache-gb", "0"])
    assert engine == {"model": "m", "tokenizer": "tok", "revision": "r1", "tokenizer_revision": "r2",
                      "download_dir": "/d", "max_logprobs": 50, "enable_chunked_prefill": False,
                      "generation_config": "vllm", "override_generation_config": {"temperature": 0.5},
                      "hf_overrides": {"rope_theta": 1.0}, "media_io_kwargs": {"video": {"num_frames": 8}},
                      "mm_processor_cache_gb": 0.0}
    assert parse_serve_args(["m", "--enable-chunked-prefill"])[0]["enable_chunked_prefill"] is True


def test_engine_flags_reach_the_engine_config(tiny_model_dir):
    from engine.config_loader import create_engine_config

    model = str(tiny_model_dir("qwen2"))
    engine, _ = parse_serve_args([model, "--max-logprobs", "-1", "--no-enable-chunked-prefill", "--max-model-len",
                                  "256", "--hf-overrides", '{"rope_theta": 12345.0}', "--mm-processor-cache-gb", "1",
                                  "--media-io-kwargs", '{"video": {"num_frames": 8}}', "--tokenizer", model])
    config = create_engine_config(**engine)
    assert config.model_config.max_logprobs == -1 and config.model_config.hf_config.rope_theta == 12345.0
    assert not config.scheduler_config.enable_chunked_prefill and config.scheduler_config.max_num_batched_tokens >= 256
    assert config.multimodal_config.media_io_kwargs == {"video": {"num_frames": 8}}
    with pytest.raises(ValueError, match="--media-io-kwargs"):
        create_engine_config(model=model, media_io_kwargs={"video": {"frames": 8}})
    with pytest.raises(ValueError, match="--max-logprobs"):
        create_engine_config(model=model, max_logprobs=-2)


def test_max_logprobs_bounds_requests(make_client, vl_frontend):
    client, _ = make_client()
    chat = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}
    response = client.post("/v1/chat/completions", json=chat)
    assert response.status_code == 400 and "--max-logprobs 20" in response.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json={**chat, "top_logprobs": 20}).status_code == 200


def test_config_yaml_gives_defaults_the_command_line_overrides(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("model: some/model\nmax-model-len: 4096\nenforce-eager: true\nenable-prefix-caching: false\n"
                      "served-model-name: [a, b]\nport: 9001\nlimit-mm-per-prompt: {image: 2}\n"
                      "override-generation-config: {top_k: 1}\nallowed-origins: ['https://x.org']\n")
    engine, server = parse_serve_args(["--config", str(config), "--max-model-len", "2048"])
    assert engine == {"model": "some/model", "max_model_len": 2048, "enforce_eager": True,
                      "enable_prefix_caching": False, "limit_mm_per_prompt": {"image": 2},
                      "override_generation_config": {"top_k": 1}}
    assert server.port == 9001 and server.served_names == ("a", "b") and server.allowed_origins == ("https://x.org",)
    config.write_text("max-modle-len: 5\n")
    with pytest.raises(ValueError, match="unknown flag 'max-modle-len'.*did you mean --max-model-len"):
        parse_serve_args(["m", "--config", str(config)])


@pytest.mark.parametrize("argv, message", [
    (["m", "--ssl-keyfile", "k.pem"], "--ssl-keyfile and --ssl-certfile"),
    (["m", "--allowed-origins", "*"], "--allowed-origins: invalid JSON"),
    (["m", "--chat-template-content-format", "xml"], "--chat-template-content-format"),
    (["m", "--hf-overrides", "[1]"], "--hf-overrides: expected a JSON object"),
    (["m", "--enable-chunked-prefil"], "did you mean --enable-chunked-prefill"),
])
def test_refusals_name_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_serve_args(argv)


def test_cors_allowed_origins(make_client):
    client, _ = make_client(allowed_origins=("https://ok.example",))
    preflight = {"Origin": "https://ok.example", "Access-Control-Request-Method": "POST"}
    response = client.options("/v1/chat/completions", headers=preflight)
    assert response.headers["access-control-allow-origin"] == "https://ok.example"
    refused = client.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in refused.headers
    client, _ = make_client()  # vLLM's default: any origin
    assert client.get("/v1/models", headers={"Origin": "https://a.example"}).headers["access-control-allow-origin"] == "*"


def test_response_role(make_client):
    client, _ = make_client(response_role="bot")
    body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert body["choices"][0]["message"]["role"] == "bot"
    body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "add_generation_prompt": False}).json()
    assert body["choices"][0]["message"]["role"] == "user"  # vLLM: the last message's role
    events = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "stream": True}).text
    assert '"role":"bot"' in events


def test_chat_template_content_format(vl_frontend):
    # A template that prints content as is: "string" flattens the parts, "openai" hands the list.
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    tokenizer = vl_frontend.tokenizer
    as_string = render_chat(tokenizer, USER, chat_template=template, content_format="string").prompt
    as_parts = render_chat(tokenizer, USER, chat_template=template, content_format="openai").prompt
    assert as_string == "[a\nb]" and as_parts.startswith("[[{") and "'text': 'b'" in as_parts
    assert render_chat(tokenizer, USER, chat_template=template).prompt == as_string  # auto: no loop over parts


def write_self_signed_certificate(key_path, cert_path) -> None:
    """A one-day certificate for 127.0.0.1 (the `cryptography` package, a test dependency)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_tls_and_root_path_on_a_real_server(vl_frontend, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    write_self_signed_certificate(key, cert)
    config = server_config(ssl_keyfile=str(key), ssl_certfile=str(cert), root_path="/proxied", host="127.0.0.1",
                           port=0)
    import uvicorn

    server = uvicorn.Server(uvicorn_config(create_app({}, config, client=FakeEngineClient(vl_frontend)), config,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        port = server.servers[0].sockets[0].getsockname()[1]
        context = ssl.create_default_context(cafile=str(cert))
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)  # plain HTTP is not served
        response = httpx.get(f"https://127.0.0.1:{port}/v1/models", verify=context, timeout=5)
        assert response.status_code == 200 and response.json()["data"][0]["id"] == "tiny-vl"
        # Behind a proxy that strips /proxied, the schema names the prefix as the server URL.
        docs = httpx.get(f"https://127.0.0.1:{port}/docs/openapi.json", verify=context, timeout=5)
        assert docs.json()["servers"] == [{"url": "/proxied"}]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_download_dir_and_revision_pick_the_snapshot(tiny_model_dir, tmp_path, monkeypatch):
    from engine.weights import resolve_model_path

    repo = tmp_path / "cache" / "models--acme--tiny"
    for ref, commit in (("main", "a" * 40), ("v2", "b" * 40)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        shutil.copytree(tiny_model_dir("qwen2"), repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = str(tmp_path / "cache")
    assert resolve_model_path("acme/tiny", download_dir=cache).endswith("a" * 40)
    assert resolve_model_path("acme/tiny", "v2", download_dir=cache).endswith("b" * 40)
    with pytest.raises(ValueError, match="cannot find"):
        resolve_model_path("acme/tiny", download_dir=str(tmp_path / "elsewhere"))


def test_media_io_kwargs_set_the_video_frame_count(vl_frontend):
    import dataclasses

    config = vl_frontend.config.replace(multimodal_config=dataclasses.replace(
        vl_frontend.config.multimodal_config, media_io_kwargs={"video": {"num_frames": 8}}))
    frontend = type(vl_frontend)(config, tokenizer=vl_frontend.tokenizer)
    assert frontend.video_sampling_kwargs(None)["nframes"] == 8
    assert frontend.video_sampling_kwargs({"num_frames": 4})["nframes"] == 4  # the request wins
    assert "nframes" not in vl_frontend.video_sampling_kwargs(None)


def test_models_list_shows_the_generation_config_defaults(vl_frontend):
    import dataclasses

    from litestar.testing import TestClient

    defaults = {"temperature": 0.1, "top_k": 1, "repetition_penalty": 1.05}
    model_config = dataclasses.replace(vl_frontend.config.model_config, default_sampling_params=defaults)
    frontend = type(vl_frontend)(vl_frontend.config.replace(model_config=model_config), tokenizer=vl_frontend.tokenizer)
    with TestClient(app=create_app({}, server_config(), client=FakeEngineClient(frontend))) as client:
        cards = client.get("/v1/models").json()["data"]
        assert [card["default_sampling_params"] for card in cards] == [defaults, defaults]
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "top_k": 5})
    [request] = client.app.state.serving.client.requests
    assert (request.sampling_params.temperature, request.sampling_params.top_k) == (0.1, 5)  # the request's wins
    assert request.sampling_params.repetition_penalty == 1.05
