"""A worker that dies mid-service (SIGKILL) is a clear WorkerError at the next step -- naming the
rank -- within seconds, not a hang of the surviving rank; later steps fail at once too."""

import os
import signal
import time

import pytest

from conftest import GREEDY, parallel_llm
from engine.executor import WorkerError


def test_killed_worker_process_is_a_clear_error(qwen2_dir):
    with parallel_llm(qwen2_dir, tensor_parallel_size=2, load_format="dummy") as llm:
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], GREEDY, use_tqdm=False)   # the world works
        pids = llm.client.core.executor.workers.call_all("pid")
        assert len(set(pids)) == 2 and os.getpid() not in pids
        os.kill(pids[1], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(WorkerError, match=r"worker rank 1 \(pid \d+\) died"):
            llm.generate([{"prompt_token_ids": [4, 5, 6]}], GREEDY, use_tqdm=False)
        assert time.monotonic() - started < 30
        with pytest.raises(WorkerError, match="rank 1"):
            llm.client.core.step()
