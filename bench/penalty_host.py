"""Host cost (median of repeated calls) of one step's penalty rows (InputBatch.sampling_batch), of the
penalty op itself (engine.sampler.apply_penalties) and of the whole sampler, on the CPU: R requests
with 400-token prompts and 100 outputs, with what Qwen2.5-VL's generation config gives every request
that leaves them unset (repetition_penalty 1.05, temperature 0.1, top_k 1, top_p 0.001).

    python bench/penalty_host.py 1 64
Run it on two checkouts (a `git worktree` of the older commit) to compare; BENCHMARKS.md has the numbers.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from engine.runner.input_batch import InputBatch
from engine.sampler import Sampler, apply_penalties
from engine.sampling_params import SamplingParams
from engine.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput

PROMPT_LEN, OUTPUT_LEN, VOCAB = 400, 100, 151936


def measure(num_requests: int) -> tuple[float, float, float]:
    batch = InputBatch(block_size=16, device=torch.device("cpu"), vocab_size=VOCAB, eos_token_ids=(7,),
                       default_seed=3)
    rng = np.random.default_rng(0)
    for i in range(num_requests):
        new = NewRequestData(f"r{i}", rng.integers(0, VOCAB, PROMPT_LEN).tolist(),
                             rng.integers(0, VOCAB, OUTPUT_LEN).tolist(), [],
                             SamplingParams(temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=1.05), [1], 0)
        batch.update(SchedulerOutput([new], CachedRequestData(), {f"r{i}": 1}, 1, {}, set(), []))
    req_ids = [f"r{i}" for i in range(num_requests)]
    rows = batch.sampling_batch(req_ids)
    rows_ms = _median_ms(lambda: batch.sampling_batch(req_ids), 50)
    logits = torch.randn(num_requests, VOCAB)
    return (rows_ms, _median_ms(lambda: apply_penalties(logits, rows), 15),
            _median_ms(lambda: Sampler()(logits, rows), 15))


def _median_ms(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    for num_requests in [int(a) for a in sys.argv[1:]] or [1, 64]:
        rows_ms, op_ms, sampler_ms = measure(num_requests)
        print(f"R={num_requests}: penalty rows {rows_ms:.2f} ms, apply_penalties {op_ms:.2f} ms, "
              f"sampler {sampler_ms:.2f} ms (CPU)", flush=True)


if __name__ == "__main__":
    main()
