"""TP=2 behind the server's client (engine core in its own daemonic process, which starts the
worker processes): it answers like transformers; then a worker killed mid-stream (SIGKILL) turns
into a clear engine failure naming the rank within seconds -- every stream ends with
EngineDeadError, /health would report it -- never a hang of the surviving rank."""

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import NUM_NEW_TOKENS, TOP_K
from engine.client import AsyncEngineClient, EngineDeadError
from engine.config_loader import create_engine_config
from engine.sampling_params import SamplingParams
from reference import hf_generate


def _spawned_children(pid: int) -> list[int]:
    """Child processes started by multiprocessing spawn (the workers; not its resource tracker)."""
    children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


async def _collect(client, request):
    return [output async for output in client.generate(request)]


def test_server_client_at_tp2_answers_then_fails_clearly_when_a_worker_dies(qwen2_dir):
    config = create_engine_config(model=str(qwen2_dir), dtype="float32", device="cpu", tensor_parallel_size=2,
                                 max_model_len=256, block_size=4, max_num_batched_tokens=16)
    client = AsyncEngineClient.start(config)
    try:
        prompt = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58]
        params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
        outputs = asyncio.run(_collect(client, client.frontend.make_request("ok", prompt, [], params)))
        reference = hf_generate(qwen2_dir, [prompt], NUM_NEW_TOKENS, top_k=TOP_K, ignore_eos=True)[0]
        assert outputs[-1].outputs[0].token_ids == reference.token_ids

        workers = _spawned_children(client.core_pid)
        assert len(workers) == 2
        victim = client.frontend.make_request("victim", prompt, [], SamplingParams(temperature=0.0, max_tokens=200))

        async def main():
            stream = client.generate(victim)
            await stream.__anext__()
            os.kill(workers[-1], signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
            return time.monotonic() - started

        assert asyncio.run(main()) < 30
        assert not client.is_healthy()
        assert "WorkerError: worker rank" in client.dead_error and "died" in client.dead_error
    finally:
        asyncio.run(client.shutdown(0))
