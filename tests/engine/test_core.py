"""EngineCore with an injected FakeRunner (no model): start-up sizing of the KV cache, request
validation turned into ERROR outputs, the step loop, abort and stats. Plus one run through the
real ModelRunner on the tiny Qwen2 checkpoint, against transformers' greedy generate."""

import logging

import pytest
import torch

from engine.config import (CacheConfig, DeviceConfig, EngineConfig, ModelConfig, MultiModalConfig,
                           ParallelConfig, SchedulerConfig)
from engine.config_loader import create_engine_config
from engine.core import EngineCore
from engine.protocol import EngineRequest, FinishReason
from engine.request import Request
from engine.sampling_params import SamplingParams
from scheduler_fixtures import (EOS_TOKEN_ID, IMAGE_PAD_ID, FakeRunner, assert_all_blocks_free,
                                make_mm_item, merge_outputs, output_token_ids, reference_tokens)


def _config(max_model_len=64, num_blocks=None, block_size=4, **scheduler) -> EngineConfig:
    model = ModelConfig(model="fake", path="/nonexistent", architecture="Fake",
                        hf_config={"text_config": {"vocab_size": 1000}}, dtype=torch.float32,
                        max_model_len=max_model_len, tokenizer="fake", eos_token_ids=(EOS_TOKEN_ID,))
    return EngineConfig(model, CacheConfig(block_size=block_size, num_gpu_blocks_override=num_blocks),
                        SchedulerConfig(max_model_len=max_model_len, **scheduler), ParallelConfig(),
                        DeviceConfig(), MultiModalConfig())


def _core(config: EngineConfig, memory_blocks: int = 64) -> tuple[EngineCore, FakeRunner]:
    num_blocks = config.cache_config.num_gpu_blocks_override or memory_blocks
    runner = FakeRunner(num_blocks, config.cache_config.block_size, num_blocks_for_memory_value=memory_blocks)
    return EngineCore(config, runner=runner), runner


def _request(req_id, prompt, mm_items=(), **sampling) -> EngineRequest:
    return EngineRequest(req_id, list(prompt), SamplingParams(**sampling), mm_items=list(mm_items))


def _run(core: EngineCore, max_steps: int = 500) -> dict:
    outputs = {}
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            return outputs
        merge_outputs(outputs, core.step().outputs)
    raise AssertionError("engine did not finish")


def test_kv_cache_is_sized_from_the_override_or_the_runner_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="engine.core"):
        core, runner = _core(_config(max_model_len=64), memory_blocks=33)
    assert runner.initialized_num_blocks == core.num_blocks == 33
    assert "KV cache: 32 blocks x 4 = 128 tokens; max concurrency at max_model_len 64: 2.00 requests" \
        in caplog.text
    core, runner = _core(_config(num_blocks=21), memory_blocks=33)
    assert runner.initialized_num_blocks == 21 and core.stats().num_total_blocks == 20


def test_a_cache_smaller_than_one_max_length_request_is_a_config_error():
    with pytest.raises(ValueError, match="--max-model-len"):
        _core(_config(max_model_len=64), memory_blocks=10)


def test_invalid_requests_finish_with_error_and_valid_ones_run():
    core, runner = _core(_config())
    core.add_request(_request("ok", [100, 101, 102], max_tokens=3))
    core.add_request(_request("ok", [100], max_tokens=3))                      # duplicate id
    core.add_request(_request("empty", []))
    core.add_request(_request("bad_temperature", [100], temperature=-1.0))
    core.add_request(_request("bad_token", [100, 1000]))
    core.add_request(_request("bad_placeholder", [100, IMAGE_PAD_ID], [make_mm_item("x", 1, 5)]))
    core.add_request(_request("too_long", [100] * 64))
    outputs = _run(core)
    errors = {output.req_id: output.error for outs in outputs.values() for output in outs
              if output.finish_reason == FinishReason.ERROR}
    assert errors == {
        "ok": "request id 'ok' is already in use",  # the live "ok" is not disturbed
        "empty": "the prompt must contain at least one token",
        "bad_temperature": "temperature must be non-negative, got -1.0",
        "bad_token": "prompt token ids must be in [0, 1000)",
        "bad_placeholder": "image placeholder (offset=1, length=5) must be non-empty, inside the "
                           "prompt of 2 tokens and after the previous item",
        "too_long": errors["too_long"],
    }
    assert "max_model_len=64" in errors["too_long"]
    valid = [output for output in outputs["ok"] if output.finish_reason != FinishReason.ERROR]
    assert len(output_token_ids(valid)) == 3 and valid[-1].finish_reason == FinishReason.LENGTH
    assert_all_blocks_free(core.scheduler)


def test_only_an_error_output_pending_keeps_the_loop_stepping():
    core, _ = _core(_config())
    assert not core.has_unfinished_requests()
    core.add_request(_request("empty", []))
    assert core.has_unfinished_requests()
    assert core.step().outputs[0].finish_reason == FinishReason.ERROR
    assert not core.has_unfinished_requests()


def test_step_loop_with_images_preemption_and_abort_matches_the_reference():
    core, runner = _core(_config(max_model_len=64, num_blocks=25, max_num_batched_tokens=16))
    prompts = {f"r{i}": [100 + i] * 4 + [IMAGE_PAD_ID] * 8 + [200 + i] * 4 for i in range(4)}
    for req_id, prompt in prompts.items():
        core.add_request(_request(req_id, prompt, [make_mm_item("pic", 4, 8)], max_tokens=30))
    core.add_request(_request("gone", [5] * 10, max_tokens=30))
    outputs = merge_outputs({}, core.step().outputs)
    core.abort_requests(["gone"])
    merge_outputs(outputs, _run(core))
    assert "gone" not in outputs and core.stats().num_preemptions > 0
    for req_id, prompt in prompts.items():
        expected = reference_tokens(Request(req_id, prompt, SamplingParams(),
                                            mm_items=[make_mm_item("pic", 4, 8)]), 30)
        assert output_token_ids(outputs[req_id]) == expected
    assert runner.num_encoded["pic"] >= 1
    stats = core.stats()
    assert (stats.num_running_reqs, stats.num_waiting_reqs, stats.kv_cache_usage) == (0, 0, 0.0)
    assert_all_blocks_free(core.scheduler)


def test_encoder_budget_defaults_to_the_largest_item_that_fits_the_context():
    core, _ = _core(_config(max_model_len=64, max_num_batched_tokens=32))
    assert core.scheduler.encoder_compute_budget == 64
    config = _config(max_model_len=64).replace(multimodal_config=MultiModalConfig(encoder_cache_size=10))
    core, _ = _core(config)
    assert core.scheduler.encoder_compute_budget == core.scheduler.encoder_cache.cache_size == 10


def test_core_with_the_real_runner_matches_transformers_greedy_under_preemption(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = str(tiny_model_dir("qwen2"))
    config = create_engine_config(model=path, device="cpu", dtype="float32", max_model_len=64,
                                 block_size=4, num_gpu_blocks_override=30, max_num_batched_tokens=24)
    core = EngineCore(config)  # builds the ModelRunner itself
    prompts = {f"r{i}": [(37 * i + 11 * p) % 200 + 3 for p in range(9 + 5 * i)] for i in range(4)}
    for req_id, prompt in prompts.items():
        core.add_request(_request(req_id, prompt, temperature=0.0, max_tokens=20, ignore_eos=True))
    outputs = _run(core)
    assert core.stats().num_preemptions > 0  # 4 x ~40 tokens in 29 blocks of 4
    assert_all_blocks_free(core.scheduler)
    hf_model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    for req_id, prompt in prompts.items():
        with torch.no_grad():
            generated = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                          min_new_tokens=20, pad_token_id=0)
        assert output_token_ids(outputs[req_id]) == generated[0, len(prompt):].tolist(), req_id


def test_an_async_core_goes_idle_once_its_requests_are_done(tiny_model_dir):
    """The busy loop (engine.core_host) steps while has_unfinished_requests(): an empty step left
    in flight must not keep it spinning on empty steps after the last request finished."""
    config = create_engine_config(model=str(tiny_model_dir("qwen2")), device="cpu", dtype="float32",
                                  max_model_len=64, block_size=4, async_scheduling=True)
    core = EngineCore(config)
    assert core.async_scheduling
    core.add_request(_request("r", [5, 6, 7, 8], temperature=0.0, max_tokens=3, ignore_eos=True))
    outputs = _run(core, max_steps=10)
    assert len(output_token_ids(outputs["r"])) == 3 and outputs["r"][-1].finish_reason == FinishReason.LENGTH
    core.add_request(_request("empty", []))   # a pending error output still gets its step
    assert core.has_unfinished_requests()
    assert _run(core, max_steps=3)["empty"][0].finish_reason == FinishReason.ERROR
    assert_all_blocks_free(core.scheduler)
