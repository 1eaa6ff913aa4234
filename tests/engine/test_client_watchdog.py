"""An engine core that stops answering while requests are in flight (simulated with SIGSTOP: the
process lives but never steps) is detected within the iteration timeout: it is killed, the
in-flight request raises EngineDeadError, and the client reports itself unhealthy. An idle core
that sends nothing for longer than the timeout is left alone."""

import asyncio
import os
import signal
import time

import pytest

from engine.client import AsyncEngineClient, EngineDeadError
from engine.config_loader import create_engine_config
from engine.sampling_params import SamplingParams

TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    config = create_engine_config(model=str(tiny_model_dir("qwen2")), device="cpu", num_gpu_blocks_override=140,
                                 max_model_len=2048)
    engine = AsyncEngineClient.start(config, iteration_timeout_s=TIMEOUT_S)
    yield engine
    asyncio.run(engine.shutdown(0.0))


def test_idle_silence_is_not_a_hang_but_a_frozen_busy_core_is(client):
    time.sleep(TIMEOUT_S * 1.5)  # idle and silent longer than the timeout
    assert client.is_healthy()

    async def run():
        request = client.frontend.make_request("w", "hello there", [], SamplingParams(max_tokens=2000, ignore_eos=True))
        stream = client.generate(request)
        await stream.__anext__()                      # the core answers ...
        os.kill(client.core_pid, signal.SIGSTOP)       # ... then freezes with the request in flight
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="stopped answering"):
            async for _ in stream:
                pass
        return time.monotonic() - started

    waited = asyncio.run(run())
    assert TIMEOUT_S * 0.5 <= waited <= TIMEOUT_S + 3.0
    assert not client.is_healthy() and "--engine-iteration-timeout" in client.dead_error
