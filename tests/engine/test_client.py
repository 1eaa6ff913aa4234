"""engine.client.AsyncEngineClient with the core in a spawned process and in a thread, on the tiny
Qwen2 checkpoint. Oracle: transformers' greedy decoding and the HF tokenizer; block accounting
from the core's own stats (every block free once nothing runs)."""

import asyncio
import os
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.client import AsyncEngineClient, EngineDeadError
from engine.config_loader import create_engine_config
from engine.sampling_params import SamplingParams

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return create_engine_config(model=str(tiny_model_dir("qwen2")), dtype="float32", max_model_len=1024,
                               num_gpu_blocks_override=128)


@pytest.fixture(scope="module")
def hf_model(config):
    return AutoModelForCausalLM.from_pretrained(config.model_config.path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(hf_model, prompt_ids, num_tokens):
    ids = list(prompt_ids)
    for _ in range(num_tokens):
        ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


@pytest.fixture(scope="module")
def process_client(config):
    client = AsyncEngineClient.start(config)
    assert client.stats.num_total_blocks == client.stats.num_free_blocks == 127  # 128 minus the null block
    yield client
    asyncio.run(client.shutdown(0))


def greedy(max_tokens=MAX_TOKENS, **kwargs):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


async def collect(client, request):
    return [output async for output in client.generate(request)]


async def wait_until_all_blocks_free(client, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = client.stats
        if stats is not None and stats.num_free_blocks == stats.num_total_blocks and stats.num_running_reqs == 0:
            return stats
        await asyncio.sleep(0.02)
    raise AssertionError(f"blocks still in use: {client.stats}")


def test_concurrent_streams_match_hf_and_are_cumulative(process_client, hf_model):
    frontend = process_client.frontend
    prompts = ["The quick brown fox", "你好 🙂 world", "a"]
    requests = [frontend.make_request(f"s{i}", p, [], greedy()) for i, p in enumerate(prompts)]

    async def main():
        return await asyncio.gather(*(collect(process_client, r) for r in requests))

    for request, stream in zip(requests, asyncio.run(main())):
        final = stream[-1]
        assert final.finished and not any(o.finished for o in stream[:-1])
        assert final.outputs[0].token_ids == hf_greedy(hf_model, request.prompt_token_ids, MAX_TOKENS)
        assert final.outputs[0].text == frontend.tokenizer.decode(final.outputs[0].token_ids, skip_special_tokens=True)
        for earlier, later in zip(stream, stream[1:]):
            assert later.outputs[0].text.startswith(earlier.outputs[0].text)
            assert later.outputs[0].token_ids[:len(earlier.outputs[0].token_ids)] == earlier.outputs[0].token_ids


def test_n_fan_out_stop_string_and_abort_free_blocks(process_client, hf_model):
    frontend = process_client.frontend
    fan_out = frontend.make_request("n", "hello", [], SamplingParams(n=3, max_tokens=5, seed=3, ignore_eos=True))
    stop_prompt = frontend.tokenizer.encode("Once upon a time")
    hf_text = frontend.tokenizer.decode(hf_greedy(hf_model, stop_prompt, MAX_TOKENS), skip_special_tokens=True)
    stop = hf_text[len(hf_text) // 2: len(hf_text) // 2 + 2]
    # max_tokens far beyond the stop string: only the client's abort can end it early.
    stopped = frontend.make_request("stop", stop_prompt, [], greedy(max_tokens=900, stop=[stop]))
    long = frontend.make_request("long", "abort me", [], greedy(max_tokens=900))

    async def main():
        n_outputs = await collect(process_client, fan_out)
        stop_outputs = await collect(process_client, stopped)
        # ~900 more decode steps would take seconds: freeing within 1 s means the core aborted it.
        await wait_until_all_blocks_free(process_client, timeout_s=1.0)
        long_outputs = []
        async for output in process_client.generate(long):
            long_outputs.append(output)
            if len(long_outputs) == 2:
                await process_client.abort("long")
        return n_outputs[-1], stop_outputs[-1], long_outputs[-1], await wait_until_all_blocks_free(process_client, 1.0)

    n_final, stop_final, long_final, stats = asyncio.run(main())
    assert [c.index for c in n_final.outputs] == [0, 1, 2] and all(len(c.token_ids) == 5 for c in n_final.outputs)
    assert len({tuple(c.token_ids) for c in n_final.outputs}) == 3
    assert stop_final.outputs[0].text == hf_text[:hf_text.index(stop)]
    assert stop_final.outputs[0].finish_reason == "stop" and stop_final.outputs[0].stop_reason == stop
    assert long_final.finished and long_final.outputs[0].finish_reason == "abort"
    assert len(long_final.outputs[0].token_ids) < 900 and stats.num_running_reqs == 0


def test_duplicate_request_id_is_a_value_error(process_client):
    request = process_client.frontend.make_request("dup", "x", [], greedy(max_tokens=50))

    async def main():
        first = process_client.generate(request)
        await first.__anext__()
        with pytest.raises(ValueError, match="already in use"):
            await process_client.generate(request).__anext__()
        await first.aclose()  # leaving early aborts it
        return await wait_until_all_blocks_free(process_client)

    assert asyncio.run(main()).num_running_reqs == 0


def test_in_process_core_and_shutdown_drain(config, hf_model):
    client = AsyncEngineClient.start(config, in_process=True)
    request = client.frontend.make_request("t", [3, 1, 4, 1, 5], [], greedy())

    async def main():
        task = asyncio.ensure_future(collect(client, request))
        await asyncio.sleep(0)
        await client.shutdown(drain_timeout_s=30)  # lets the in-flight request finish
        return await task

    outputs = asyncio.run(main())
    assert outputs[-1].outputs[0].token_ids == hf_greedy(hf_model, [3, 1, 4, 1, 5], MAX_TOKENS)
    with pytest.raises(EngineDeadError, match="shutting down"):
        asyncio.run(collect(client, request))


def test_engine_death_is_seen_at_once(process_client):
    """Kills the module's process client (one spawn less per run): keep this test last."""
    client = process_client
    request = client.frontend.make_request("victim", "hello", [], greedy(max_tokens=1000))

    async def main():
        stream = client.generate(request)
        await stream.__anext__()
        os.kill(client.core_pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        return time.monotonic() - started

    assert asyncio.run(main()) < 2.0
    assert not client.is_healthy() and "exit code" in client.dead_error
    with pytest.raises(EngineDeadError):
        asyncio.run(collect(client, client.frontend.make_request("after", "x", [], greedy())))
