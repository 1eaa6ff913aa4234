"""engine.runner.sampling_rows through InputBatch: the per-step SamplingBatch read from the
persistent SamplingTable equals what each request's SamplingParams say, also after a finished
request's row is taken by a new one with other settings (hand-computed expectations)."""

import zlib

import torch

from engine.runner.input_batch import InputBatch
from engine.sampler import seed_keys
from engine.sampling_params import SamplingParams
from engine.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput

VOCAB, EOS = 100, 7


def _add(batch: InputBatch, req_id: str, params: SamplingParams, finished=()) -> None:
    new = NewRequestData(req_id, [1, 2, 3], [5, 6], [], params, [1], 0)
    batch.update(SchedulerOutput([new], CachedRequestData(), {req_id: 5}, 5, {}, set(finished), []))


def test_batch_follows_each_request_params_and_reused_rows():
    batch = InputBatch(block_size=16, device=torch.device("cpu"), vocab_size=VOCAB, eos_token_ids=(EOS,),
                       default_seed=3)
    _add(batch, "seeded", SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=11, logprobs=2))
    _add(batch, "greedy", SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=[9]))
    first = batch.sampling_batch(["seeded", "greedy"])
    assert first.temperature.tolist() == [torch.tensor(0.7).item(), 0.0] and not first.all_greedy
    assert first.top_k.tolist() == [5, VOCAB] and first.min_p is None
    assert first.top_p.tolist() == [torch.tensor(0.9).item(), 1.0]
    assert first.max_num_logprobs == 2
    assert first.banned_token_ids.tolist() == [[-1, -1], [9, EOS]]   # 2 outputs < min_tokens 4
    unseeded = zlib.crc32(b"greedy") ^ 3
    assert first.seed_keys.tolist() == seed_keys([11, unseeded], [2, 2]).tolist()
    # "seeded" finishes; "late" takes its row with none of its settings
    _add(batch, "late", SamplingParams(temperature=0.0, seed=5), finished=["seeded"])
    assert batch.requests["late"].row == 0
    second = batch.sampling_batch(["greedy", "late"])
    assert second.all_greedy and second.top_k is None and second.top_p is None
    assert second.max_num_logprobs is None
    assert second.seed_keys.tolist() == seed_keys([unseeded, 5], [2, 2]).tolist()


def test_penalty_rows_count_the_token_still_on_the_device():
    """Async scheduling: a launched step's token (mark_launched) is in the next step's penalty rows,
    read from the device tensor, before append_sampled brings it to the host."""
    batch = InputBatch(block_size=16, device=torch.device("cpu"), vocab_size=VOCAB, eos_token_ids=(EOS,),
                       default_seed=3)
    _add(batch, "penalised", SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5))
    _add(batch, "plain", SamplingParams(temperature=0.0, presence_penalty=0.2))
    batch.mark_launched(["plain", "penalised"], torch.tensor([42, 17]))   # the values the host lacks
    rows = batch.sampling_batch(["penalised", "plain"])
    assert rows.prompt_token_ids.tolist() == [[1, 2, 3], [1, 2, 3]]
    assert rows.output_token_ids.tolist() == [[5, 6, 17], [5, 6, 42]]
    assert rows.repetition_penalty.tolist() == [torch.tensor(1.3).item(), 1.0]
    batch.append_sampled(["plain", "penalised"], [[42], [17]])
    assert batch.sampling_batch(["penalised"]).output_token_ids.tolist() == [[5, 6, 17]]


def test_repetition_rows_hold_each_prompt_token_once():
    batch = InputBatch(block_size=16, device=torch.device("cpu"), vocab_size=VOCAB, eos_token_ids=(EOS,),
                       default_seed=3)
    new = NewRequestData("image", [9, 4, 4, 4, 4, 9, 1], [], [], SamplingParams(repetition_penalty=1.05), [1], 0)
    batch.update(SchedulerOutput([new], CachedRequestData(), {"image": 7}, 7, {}, set(), []))
    assert batch.sampling_batch(["image"]).prompt_token_ids.tolist() == [[1, 4, 9]]


def test_top_k_one_rows_are_greedy():
    """top-k 1 keeps one token whatever the temperature: such rows are greedy, so a batch of them
    skips the sampler's per-vocabulary sort (the parity test checks the tokens against transformers)."""
    batch = InputBatch(block_size=16, device=torch.device("cpu"), vocab_size=VOCAB, eos_token_ids=(EOS,),
                       default_seed=3)
    _add(batch, "qwen_vl_default", SamplingParams(temperature=0.1, top_k=1, top_p=0.001))
    _add(batch, "sampled", SamplingParams(temperature=0.1, top_k=2))
    alone = batch.sampling_batch(["qwen_vl_default"])
    assert alone.all_greedy and alone.temperature.tolist() == [0.0]
    both = batch.sampling_batch(["qwen_vl_default", "sampled"])
    assert not both.all_greedy and both.temperature.tolist() == [0.0, torch.tensor(0.1).item()]
