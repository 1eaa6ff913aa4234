"""The same TP=2 world as Ray actors in a placement group, on a local Ray cluster the test starts:
tiny Qwen2 greedy tokens and top-5 logprobs as transformers' (chunked prefill); then a killed
actor is a clear WorkerError at the next step, not a hang."""

import os
import signal
import time

import pytest

from conftest import GREEDY, NUM_NEW_TOKENS, TOP_K, assert_matches_reference, parallel_llm
from engine.executor import WorkerError
from reference import hf_generate

PROMPTS = [list(range(40, 60)), [7, 300, 5, 19, 33, 801, 2]]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_tp2_matches_transformers_and_reports_a_dead_actor(ray_cluster, qwen2_dir):
    references = hf_generate(qwen2_dir, PROMPTS, NUM_NEW_TOKENS, top_k=TOP_K, ignore_eos=True)
    with parallel_llm(qwen2_dir, tensor_parallel_size=2, distributed_executor_backend="ray") as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        assert_matches_reference(outputs, references)
        pids = llm.client.core.executor.workers.call_all("pid")
        assert len(set(pids)) == 2 and os.getpid() not in pids
        os.kill(pids[0], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(WorkerError, match="Ray worker rank 0 died"):
            llm.generate([{"prompt_token_ids": [4, 5, 6]}], GREEDY, use_tqdm=False)
        assert time.monotonic() - started < 60
