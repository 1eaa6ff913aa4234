"""InputBatch.prepare's decode fast paths, checked by hand: a step whose every row is the token the
last step sampled (async scheduling) reads that tensor itself, and a step whose every row samples
needs no logits gather; any other step builds its rows and gathers as before."""

from __future__ import annotations

import torch

from engine.runner.input_batch import InputBatch
from engine.sampling_params import SamplingParams
from engine.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput

BLOCK = 4


def _new(req_id: str, prompt: list[int], block: int) -> NewRequestData:
    return NewRequestData(req_id=req_id, prompt_token_ids=prompt, output_token_ids=[], mm_items=[],
                          sampling_params=SamplingParams(temperature=0.0, max_tokens=8), block_ids=[block],
                          num_computed_tokens=0)


def _step(counts: dict[str, int], new=(), cached: dict[str, int] | None = None) -> SchedulerOutput:
    cached = cached or {}
    return SchedulerOutput(
        scheduled_new_reqs=list(new),
        scheduled_cached_reqs=CachedRequestData(req_ids=list(cached), new_block_ids=[[] for _ in cached],
                                                num_computed_tokens=list(cached.values())),
        num_scheduled_tokens=counts, total_num_scheduled_tokens=sum(counts.values()),
        scheduled_encoder_inputs={}, finished_req_ids=set(), free_encoder_mm_hashes=[])


def _prefilled() -> InputBatch:
    """Two requests after their prompt step: a (3 tokens), b (2 tokens), sampled 11 and 22 (pending)."""
    batch = InputBatch(BLOCK, torch.device("cpu"), vocab_size=100)
    prompt_step = _step({"a": 3, "b": 2}, new=[_new("a", [5, 6, 7], 1), _new("b", [8, 9], 2)])
    batch.update(prompt_step)
    first = batch.prepare(prompt_step)
    assert first.logits_indices.tolist() == [2, 4]   # prompt rows: the last row of each request samples
    batch.mark_launched(["a", "b"], torch.tensor([11, 22]))
    return batch


def test_a_decode_step_of_pending_rows_in_order_reads_the_sampled_tensor():
    batch = _prefilled()
    decode = _step({"a": 1, "b": 1}, cached={"a": 3, "b": 2})
    batch.update(decode)
    step = batch.prepare(decode)
    assert step.input_ids is batch.last_sampled
    assert step.logits_indices is None   # every row samples: hidden rows are the logits rows
    assert step.positions.tolist() == [3, 2]


def test_pending_rows_in_another_order_are_gathered():
    batch = _prefilled()
    decode = _step({"b": 1, "a": 1}, cached={"a": 3, "b": 2})
    batch.update(decode)
    step = batch.prepare(decode)
    assert step.input_ids is not batch.last_sampled
    assert step.input_ids.tolist() == [22, 11]


def test_a_known_token_beside_a_pending_one_is_gathered():
    batch = _prefilled()
    batch.append_sampled(["a"], [[11]])   # a's token reached the host; b's is still pending
    decode = _step({"a": 1, "b": 1}, cached={"a": 3, "b": 2})
    batch.update(decode)
    step = batch.prepare(decode)
    assert step.input_ids.tolist() == [11, 22]
    assert step.logits_indices is None
