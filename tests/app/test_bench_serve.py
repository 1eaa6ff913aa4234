"""`vlserve bench serve` against a real uvicorn server (tiny qwen2_5_vl on the CPU, real engine).

Oracles: counts fixed by the flags (requests, images, --output-len tokens under --ignore-eos), each
request's prompt length from transformers' own processor + chat template on the very messages sent,
the gap schedule of --request-rate as a lower bound on the duration, and hand-computed metrics."""

import asyncio
import base64
import io
import json
import math

import httpx
import msgspec
import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor

from app.benchmark.dataset import DatasetConfig, build_requests
from app.benchmark.metrics import RunInfo, compute_metrics
from app.benchmark.requests import RequestResult, send_request
from app.benchmark.serve import arrival_gaps
from app.cli import main
from app.server import create_app
from tests.app.conftest import UvicornThread, server_config
from vision.limits import MultiModalLimits

API_KEY = "bench-key"
ENGINE_KWARGS = dict(max_model_len=1024, limit_mm_per_prompt={"image": 2}, device="cpu",
                     num_gpu_blocks_override=256, max_num_seqs=8)


@pytest.fixture(scope="module")
def model_path(tiny_model_dir) -> str:
    return str(tiny_model_dir("qwen2_5_vl"))


@pytest.fixture(scope="module")
def server(model_path):
    config = server_config(model=model_path, served_model_names=("tiny-vl",), api_keys=(API_KEY,),
                           limits=MultiModalLimits.parse({"image": 2}), disable_log_requests=True)
    with UvicornThread(create_app({"model": model_path, **ENGINE_KWARGS}, config)) as running:
        yield running


def run_bench(server, tmp_path, monkeypatch, *flags: str) -> tuple[int, dict | None]:
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    result_file = tmp_path / "result.json"
    code = main(["bench", "serve", "--base-url", server.base_url, "--disable-tqdm", "--save-result",
                 "--result-dir", str(tmp_path), "--result-filename", result_file.name, *flags])
    return code, json.loads(result_file.read_text()) if result_file.exists() else None


def hf_prompt_lengths(model_path: str, dataset: DatasetConfig) -> list[int]:
    """Prompt tokens transformers' processor gives the messages the benchmark sends."""
    processor = AutoProcessor.from_pretrained(model_path)
    lengths = []
    for request in build_requests(dataset, "tiny-vl", True, {}, dataset.num_prompts + 1)[1:]:
        messages = msgspec.json.decode(request.body)["messages"]
        for part in messages[0]["content"]:
            if part["type"] == "image_url":  # transformers loads data URLs itself
                part.update(type="image", url=part.pop("image_url")["url"])
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        lengths.append(len(inputs["input_ids"][0]))
    return lengths


def test_image_chat_load_counts_match_the_flags_and_transformers(server, model_path, tmp_path, monkeypatch, capsys):
    code, result = run_bench(server, tmp_path, monkeypatch, "--num-prompts", "6", "--max-concurrency", "3",
                             "--images-per-request", "2", "--image-size", "112x84", "--input-len", "10",
                             "--output-len", "5", "--ignore-eos", "--seed", "7")
    assert code == 0
    dataset = DatasetConfig(num_prompts=6, input_len=10, output_len=5, image_size=(112, 84), images_per_request=2,
                            seed=7)
    assert result["completed"] == 6 and result["failed"] == 0 and result["errors"] == [""] * 6
    assert result["output_lens"] == [5] * 6 and result["total_output_tokens"] == 30
    assert result["input_lens"] == hf_prompt_lengths(model_path, dataset)
    assert result["total_input_tokens"] == sum(result["input_lens"]) and result["model_id"] == "tiny-vl"
    assert result["num_images"] == 12 and result["num_without_usage"] == 0
    duration = result["duration"]
    assert math.isclose(result["image_throughput"], 12 / duration)
    assert math.isclose(result["output_throughput"], 30 / duration)
    assert math.isclose(result["total_token_throughput"], (30 + result["total_input_tokens"]) / duration)
    e2el_ms = result["p99_e2el_ms"]
    assert 0 < result["median_ttft_ms"] <= result["p99_ttft_ms"] <= e2el_ms <= duration * 1e3
    assert 0 < result["median_tpot_ms"] and 0 < result["mean_itl_ms"] <= e2el_ms
    printed = capsys.readouterr().out
    for label, value in (("Successful requests:", "6"), ("Total generated tokens:", "30"),
                         ("Maximum request concurrency:", "3"), ("Total input images:", "12")):
        assert f"{label:<40} {value}" in printed, label
    for line in ("Median TTFT (ms):", "P99 TPOT (ms):", "Mean ITL (ms):", "P99 E2EL (ms):",
                 "Image throughput (images/s):"):
        assert line in printed, line


def test_request_rate_spaces_the_arrivals_and_completions_endpoint(server, tmp_path, monkeypatch):
    code, result = run_bench(server, tmp_path, monkeypatch, "--endpoint", "/v1/completions", "--dataset-name",
                             "random", "--num-prompts", "4", "--request-rate", "8", "--output-len", "3",
                             "--ignore-eos", "--seed", "3", "--model", "tiny-vl")
    assert code == 0 and result["completed"] == 4 and result["output_lens"] == [3] * 4
    assert result["num_images"] == 0 and result["request_rate"] == 8
    assert result["duration"] >= sum(arrival_gaps(4, 8.0, 1.0, 3))


def test_refused_requests_fail_the_initial_test_clearly(server, tmp_path, monkeypatch, capsys):
    code, result = run_bench(server, tmp_path, monkeypatch, "--images-per-request", "3", "--image-size", "28x28",
                             "--num-prompts", "2")
    assert code == 1 and result is None
    error = capsys.readouterr().err
    assert "initial test request failed" in error and "HTTP 400" in error
    assert "at most 2 image(s) per prompt, got 3" in error


def test_bad_flags_name_the_flag(capsys):
    assert main(["bench", "serve", "--image-size", "448by448"]) == 2
    assert "--image-size" in capsys.readouterr().err
    assert main(["bench", "serve", "--max-concurrency", "0"]) == 2
    assert "--max-concurrency" in capsys.readouterr().err


def test_metrics_by_hand():
    def done(ttft, latency, output_tokens, itl):
        return RequestResult(success=True, ttft=ttft, latency=latency, output_tokens=output_tokens, itl=itl,
                             prompt_tokens=10, has_usage=True)

    results = [done(0.1, 1.1, 11, [0.1] * 10), done(0.3, 0.5, 3, [0.1, 0.1]), done(0.2, 0.2, 1, []),
               RequestResult(error="HTTP 500")]
    info = RunInfo(duration_s=2.0, num_images_sent=3, max_concurrency=None, request_rate=math.inf,
                   percentile_metrics=("ttft",), metric_percentiles=(50.0, 99.0))
    metrics = compute_metrics(results, info)
    assert (metrics["completed"], metrics["failed"], metrics["total_output_tokens"]) == (3, 1, 15)
    assert math.isclose(metrics["output_throughput"], 7.5) and math.isclose(metrics["image_throughput"], 1.5)
    assert math.isclose(metrics["mean_tpot_ms"], (100 + 100) / 2)  # (1.1-0.1)/10 and (0.5-0.3)/2; 1 token: none
    assert math.isclose(metrics["mean_ttft_ms"], 200) and math.isclose(metrics["p50_ttft_ms"], 200)
    assert math.isclose(metrics["p99_ttft_ms"], 298)  # linear between 200 and 300 at 0.98
    assert math.isclose(metrics["mean_itl_ms"], 100) and math.isclose(metrics["mean_e2el_ms"], 600)


def test_arrival_gaps_have_the_requested_rate_and_burstiness():
    assert arrival_gaps(5, math.inf, 1.0, 0) == [0.0] * 5
    gaps = np.asarray(arrival_gaps(40_001, 4.0, 0.5, 1)[1:])
    assert abs(gaps.mean() - 0.25) < 0.01  # mean 1/rate
    assert abs(gaps.var() - 0.25**2 / 0.5) < 0.01  # gamma(k, 1/(rate k)): variance 1/(rate^2 k)


def test_images_are_fresh_and_sized():
    [a, b] = build_requests(DatasetConfig(num_prompts=2, image_size=(64, 32)), "m", True, {"ignore_eos": True})
    urls = [msgspec.json.decode(r.body)["messages"][0]["content"][0]["image_url"]["url"] for r in (a, b)]
    assert urls[0] != urls[1]
    image = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
    assert image.format == "PNG" and image.size == (64, 32)
    body = msgspec.json.decode(a.body)
    assert body["ignore_eos"] is True and body["stream_options"] == {"include_usage": True}
    assert len(body["messages"][0]["content"][1]["text"].split()) == 64


def _sse_transport(events: list[str], status: int = 200) -> httpx.MockTransport:
    body = "".join(f"data: {event}\n\n" for event in events).encode()
    return httpx.MockTransport(lambda request: httpx.Response(status, content=body))


def _chunk(content: str | None, role: str | None = None) -> str:
    delta = {"content": content} | ({"role": role} if role else {})
    return json.dumps({"choices": [{"index": 0, "delta": delta}]})


def test_a_server_without_usage_is_counted_by_text_chunks():
    events = [_chunk("", role="assistant"), _chunk("Hel"), _chunk("lo"), _chunk(None), _chunk("!"), "[DONE]"]

    async def run():
        async with httpx.AsyncClient(transport=_sse_transport(events)) as client:
            return await send_request(client, "http://x/v1/chat/completions", b"{}", True, {})

    result = asyncio.run(run())
    assert result.success and result.generated_text == "Hello!" and not result.has_usage
    assert result.output_tokens == 3 and len(result.itl) == 2 and 0 < result.ttft <= result.latency


def test_http_errors_and_error_events_are_failures():
    async def run(transport):
        async with httpx.AsyncClient(transport=transport) as client:
            return await send_request(client, "http://x/v1/completions", b"{}", False, {})

    refused = asyncio.run(run(_sse_transport(['{"error": "no"}'], status=503)))
    assert not refused.success and refused.error.startswith("HTTP 503")
    broken = asyncio.run(run(_sse_transport([json.dumps({"choices": [{"text": "a"}]}),
                                             json.dumps({"error": {"message": "engine died"}}), "[DONE]"])))
    assert not broken.success and "engine died" in broken.error
