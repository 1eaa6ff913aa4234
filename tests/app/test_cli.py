"""`vlserve serve` / `python -m app` flag parsing: vLLM's names and meanings, both spellings, the
two --limit-mm-per-prompt forms, clear refusals of accepted-but-unsupported values, suggestions."""

import subprocess
import sys

import pytest

from app.chat_templates import load_bundled
from app.cli import main, parse_serve_args


def test_flags_map_to_engine_kwargs_and_server_config(monkeypatch):
    monkeypatch.delenv("VLSERVE_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    engine, server = parse_serve_args([
        "some/model", "--max_model_len", "4096", "--gpu-memory-utilization", "0.8", "--max-num-seqs", "8",
        "--max_num_batched_tokens", "1024", "--block-size", "32", "--dtype", "bfloat16", "--seed", "3",
        "--limit-mm-per-prompt", "image=5,video=1", "--mm-processor-kwargs", '{"max_pixels": 1000}',
        "--no-enable-prefix-caching", "--enforce-eager", "-tp", "1", "--device", "cpu", "--num-gpu-blocks-override",
        "64", "--load-format", "dummy", "--served-model-name", "a", "b", "--api-key", "k", "--port", "9000",
        "--chat-template", "qwen2_vl", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--allowed-media-domains", "example.com", "--allowed-local-media-path", "/data", "--max-log-len", "10",
        "--disable-log-requests", "--uvicorn-log-level", "WARNING", "--trust-remote-code"])
    assert engine == {"model": "some/model", "max_model_len": 4096, "gpu_memory_utilization": 0.8, "max_num_seqs": 8,
                      "max_num_batched_tokens": 1024, "block_size": 32, "dtype": "bfloat16", "seed": 3,
                      "limit_mm_per_prompt": {"image": 5, "video": 1}, "mm_processor_kwargs": {"max_pixels": 1000},
                      "enable_prefix_caching": False, "enforce_eager": True, "tensor_parallel_size": 1,
                      "device": "cpu", "num_gpu_blocks_override": 64, "load_format": "dummy",
                      "trust_remote_code": True}
    assert server.served_names == ("a", "b") and server.api_keys == ("k",) and server.port == 9000
    assert server.chat_template == load_bundled("qwen2_vl") and server.tool_call_parser == "hermes"
    assert server.limits.max_items("image") == 5 and server.limits.max_items("video") == 1
    assert server.allowed_media_domains == ("example.com",) and server.allowed_local_media_path == "/data"
    assert server.disable_log_requests and server.max_log_len == 10 and server.uvicorn_log_level == "warning"


def test_defaults_leave_engine_defaults_alone_and_env_key(monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    engine, server = parse_serve_args(["--model", "m"])
    assert engine == {"model": "m"}
    assert server.served_names == ("m",) and server.api_keys == ("from-env",) and server.limits.max_items("image") == 999
    monkeypatch.setenv("VLSERVE_API_KEY", "ours")
    assert parse_serve_args(["m"])[1].api_keys == ("ours",)


def test_json_limits_and_enable_prefix_caching():
    engine, server = parse_serve_args(["m", "--limit-mm-per-prompt", '{"image": {"count": 2, "width": 512}}',
                                       "--enable-prefix-caching"])
    assert engine["limit_mm_per_prompt"] == {"image": {"count": 2, "width": 512}}
    assert engine["enable_prefix_caching"] is True and server.limits.max_items("image") == 2


@pytest.mark.parametrize("argv, message", [
    (["m", "--quantization", "awq"], "--quantization 'awq': quantized checkpoints are not supported"),
    (["m", "--kv-cache-dtype", "fp8"], "--kv-cache-dtype 'fp8': not supported"),
    (["m", "--cpu-offload-gb", "4"], "--cpu-offload-gb 4.0: weight offloading is not supported"),
    (["m", "--device", "tpu"], "--device 'tpu'"),
    (["m", "--tool-call-parser", "mistral"], "--tool-call-parser: 'mistral' is not supported"),
    (["m", "--enable-auto-tool-choice"], "requires --tool-call-parser"),
    (["m", "--limit-mm-per-prompt", "audio=1"], "unknown modality 'audio'"),
    (["m", "--limit-mm-per-prompt", "image"], "--limit-mm-per-prompt"),
    (["m", "--mm-processor-kwargs", "{bad"], "--mm-processor-kwargs: invalid JSON"),
    (["m", "--chat-template", "nope"], "--chat-template"),
    (["m", "--max-modle-len", "5"], "did you mean --max-model-len"),
    (["m", "--port", "70000"], "--port"),
    ([], "a model is required"),
])
def test_refusals_name_the_flag(argv, message):
    with pytest.raises(ValueError) as error:
        parse_serve_args(argv)
    assert message in str(error.value)


def test_main_help_and_errors(capsys):
    assert main(["serve", "m", "--quantization", "awq"]) == 2
    assert "not supported" in capsys.readouterr().err
    for command in (["vlserve", "--help"], ["vlserve", "serve", "--help"], [sys.executable, "-m", "app", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage:" in result.stdout, (command, result.stderr)
    assert "--limit-mm-per-prompt" in result.stdout


def test_engine_tuning_flags_reach_the_engine_config(tiny_model_dir):
    from app.cli import parse_serve_args
    from engine.config_loader import create_engine_config

    model = str(tiny_model_dir("qwen2"))
    kwargs, _ = parse_serve_args([model, "--no-deterministic", "--encoder_cache_size", "4096", "--device", "cpu"])
    assert kwargs == {"model": model, "deterministic": False, "encoder_cache_size": 4096, "device": "cpu"}
    config = create_engine_config(**kwargs)
    assert config.device_config.deterministic is False and config.multimodal_config.encoder_cache_size == 4096
    assert parse_serve_args([model, "--deterministic"])[0]["deterministic"] is True
