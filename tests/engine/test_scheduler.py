"""Scheduler with no model: FakeRunner (scheduler_fixtures) simulates a paged KV cache, and
generated tokens are checked against `reference_tokens` (the fake model applied directly to the
true sequence) or against hand-written expectations. Every scenario ends with all blocks free."""

import pytest

from engine.protocol import FinishReason
from engine.request import RequestStatus
from scheduler_fixtures import (
    EOS_TOKEN_ID, IMAGE_PAD_ID, assert_all_blocks_free, create_request, create_requests,
    create_scheduler, make_mm_item, make_runner, merge_outputs, output_token_ids, reference_tokens,
    run_to_completion, step,
)


def _assert_matches_reference(requests, outputs, num_tokens):
    for request in requests:
        assert output_token_ids(outputs[request.req_id]) == reference_tokens(request, num_tokens), request
        assert outputs[request.req_id][-1].finish_reason == FinishReason.LENGTH


def test_requests_generate_reference_tokens_and_free_all_blocks():
    scheduler = create_scheduler(block_size=4, num_blocks=200)
    requests = [create_request(f"r{i}", [100 + i * 3 + p for p in range(5 + 7 * i)], max_tokens=9)
                for i in range(5)]
    outputs = run_to_completion(scheduler, make_runner(scheduler), requests)
    _assert_matches_reference(requests, outputs, 9)
    assert all(len(outputs[r.req_id]) == 9 for r in requests)  # one output per token
    assert_all_blocks_free(scheduler)


def test_chunked_prefill_respects_the_budget_and_mixes_in_decodes():
    scheduler = create_scheduler(max_num_batched_tokens=32, block_size=4)
    runner = make_runner(scheduler)
    short, long = create_request("short", list(range(100, 110)), max_tokens=12), \
        create_request("long", [200 + p for p in range(100)], max_tokens=3)
    scheduler.add_request(short)
    assert step(scheduler, runner)[0].num_scheduled_tokens == {"short": 10}
    scheduler.add_request(long)
    chunks, long_tokens = [], []
    for _ in range(4):
        scheduler_output, outputs = step(scheduler, runner)
        assert scheduler_output.num_scheduled_tokens["short"] == 1  # decodes go first
        chunks.append(scheduler_output.num_scheduled_tokens["long"])
        long_tokens += [t for output in outputs if output.req_id == "long" for t in output.new_token_ids]
    assert chunks == [31, 31, 31, 7]
    assert len(long_tokens) == 1  # sampled only when its last prompt chunk ran
    outputs = run_to_completion(scheduler, runner)
    assert long_tokens + output_token_ids(outputs["long"]) == reference_tokens(long, 3)
    assert len(output_token_ids(outputs["short"])) == 12 - 5
    assert_all_blocks_free(scheduler)


def test_prefix_hits_are_counted_and_never_cover_the_whole_prompt():
    scheduler = create_scheduler(block_size=16)
    runner = make_runner(scheduler)
    prompt = [300 + p for p in range(32)]  # exactly two blocks
    first = create_request("first", prompt, max_tokens=4)
    run_to_completion(scheduler, runner, [first])
    second, third = create_request("second", prompt, max_tokens=4), \
        create_request("third", prompt + [5] * 8, max_tokens=4)
    scheduler.add_request(second)
    scheduler.add_request(third)
    scheduler_output, first_outputs = step(scheduler, runner)
    new = {data.req_id: data for data in scheduler_output.scheduled_new_reqs}
    assert new["second"].num_computed_tokens == 16  # the last token is always recomputed
    assert scheduler_output.num_scheduled_tokens == {"second": 16, "third": 8}
    assert new["third"].num_computed_tokens == 32
    outputs = merge_outputs({}, first_outputs)
    merge_outputs(outputs, run_to_completion(scheduler, runner))
    stats = scheduler.make_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (32 + 32 + 40, 16 + 32)
    assert outputs["second"][-1].num_cached_tokens == 16
    for request in (second, third):
        assert output_token_ids(outputs[request.req_id]) == reference_tokens(request, 4)
    assert_all_blocks_free(scheduler)


@pytest.mark.parametrize("change", ["mm_hash", "cache_salt", "nothing"])
def test_prefix_cache_keys_on_mm_hash_and_salt(change):
    scheduler = create_scheduler(block_size=8)
    runner = make_runner(scheduler)
    prompt = [400 + p for p in range(4)] + [IMAGE_PAD_ID] * 16 + [500 + p for p in range(12)]
    first = create_request("first", prompt, mm_items=[make_mm_item("cat", 4, 16)], cache_salt="a")
    run_to_completion(scheduler, runner, [first])
    second = create_request("second", prompt, mm_items=[make_mm_item(
        "dog" if change == "mm_hash" else "cat", 4, 16)], cache_salt="b" if change == "cache_salt" else "a")
    outputs = run_to_completion(scheduler, runner, [second])
    expected_hit = {"mm_hash": 0, "cache_salt": 0, "nothing": 24}[change]  # 31 // 8 = 3 blocks at most
    assert outputs["second"][0].num_cached_tokens == expected_hit
    # The fake model reads the image rows from the KV cache: a wrong hit would change the tokens.
    assert output_token_ids(outputs["second"]) == reference_tokens(second, 8)
    assert_all_blocks_free(scheduler)


def test_preemption_recomputes_to_the_same_tokens_and_frees_everything():
    requests = create_requests(4, num_tokens=20, max_tokens=40)
    scheduler = create_scheduler(block_size=4, num_blocks=31)  # 120 tokens for 4 x 60 needed
    runner = make_runner(scheduler)
    for request in requests:
        scheduler.add_request(request)
    outputs, preempted_order = {}, []
    while scheduler.has_unfinished_requests():
        running_before = [request.req_id for request in scheduler.running]
        num_before = scheduler.num_preemptions
        scheduler_output, step_outputs = step(scheduler, runner)
        merge_outputs(outputs, step_outputs)
        if scheduler.num_preemptions > num_before:
            preempted = [r.req_id for r in scheduler.waiting if r.req_id in scheduler_output.finished_req_ids]
            assert len(preempted) == scheduler.num_preemptions - num_before
            # The newest running requests go, and they wait at the front of the queue in order.
            assert running_before[-len(preempted):] == preempted
            assert scheduler.waiting[0].req_id == preempted[0]
            preempted_order.extend(preempted)
    assert scheduler.num_preemptions == len(preempted_order) > 0
    assert "req0" not in preempted_order  # the oldest request is never the victim
    _assert_matches_reference(requests, outputs, 40)
    assert_all_blocks_free(scheduler)
    unconstrained = create_scheduler(block_size=4, num_blocks=1000)
    fresh = create_requests(4, num_tokens=20, max_tokens=40)
    free_outputs = run_to_completion(unconstrained, make_runner(unconstrained), fresh)
    assert unconstrained.num_preemptions == 0
    assert {k: output_token_ids(v) for k, v in free_outputs.items()} == \
        {k: output_token_ids(v) for k, v in outputs.items()}


def test_abort_frees_blocks_of_running_and_waiting_requests():
    scheduler = create_scheduler(block_size=4, max_num_seqs=2)
    runner = make_runner(scheduler)
    requests = create_requests(3, num_tokens=10, max_tokens=20)
    for request in requests:
        scheduler.add_request(request)
    step(scheduler, runner)
    step(scheduler, runner)
    assert scheduler.kv_cache_manager.get_block_ids("req1")
    scheduler.abort_requests(["req1", "req2", "unknown"])  # running, waiting, never seen
    assert requests[1].status == RequestStatus.FINISHED_ABORTED
    assert "req1" not in scheduler.kv_cache_manager.req_to_blocks
    scheduler_output, outputs = step(scheduler, runner)
    assert {"req1", "req2"} <= scheduler_output.finished_req_ids
    assert all(output.req_id == "req0" for output in outputs)  # no output for aborted requests
    outputs = run_to_completion(scheduler, runner)
    assert set(outputs) == {"req0"}
    assert_all_blocks_free(scheduler)


def test_max_num_seqs_caps_the_batch():
    scheduler = create_scheduler(max_num_seqs=2)
    runner = make_runner(scheduler)
    requests = create_requests(5, num_tokens=6, max_tokens=3)
    for request in requests:
        scheduler.add_request(request)
    seen = []
    while scheduler.has_unfinished_requests():
        scheduler_output, _ = step(scheduler, runner)
        assert len(scheduler_output.num_scheduled_tokens) <= 2
        seen.append(sorted(scheduler_output.num_scheduled_tokens))
    assert seen[0] == ["req0", "req1"]
    assert_all_blocks_free(scheduler)


def test_a_chunk_may_cut_through_a_placeholder_and_the_item_is_encoded_once():
    scheduler = create_scheduler(max_num_batched_tokens=16, block_size=4)
    runner = make_runner(scheduler)
    prompt = list(range(100, 110)) + [IMAGE_PAD_ID] * 20 + list(range(110, 120))
    request = create_request("r", prompt, mm_items=[make_mm_item("img", 10, 20)], max_tokens=2)
    scheduler.add_request(request)
    first, _ = step(scheduler, runner)
    assert first.num_scheduled_tokens == {"r": 16} and first.scheduled_encoder_inputs == {"r": [0]}
    second, _ = step(scheduler, runner)  # tokens 16..31: the rest of the image, from the cache
    assert second.scheduled_encoder_inputs == {}
    assert scheduler.encoder_cache.num_referencing("img") == 0  # placeholder done: released
    outputs = run_to_completion(scheduler, runner)
    assert runner.num_encoded["img"] == 1
    assert output_token_ids(outputs["r"]) == reference_tokens(request, 2)
    assert_all_blocks_free(scheduler)


def test_encoder_budget_cuts_the_chunk_before_a_placeholder():
    scheduler = create_scheduler(encoder_budget=20, block_size=4)
    runner = make_runner(scheduler)
    prompt = [100] * 5 + [IMAGE_PAD_ID] * 20 + [101] * 5 + [IMAGE_PAD_ID] * 20 + [102] * 10
    items = [make_mm_item("a", 5, 20), make_mm_item("b", 30, 20)]
    request = create_request("r", prompt, mm_items=items, max_tokens=2)
    scheduler.add_request(request)
    first, _ = step(scheduler, runner)
    assert first.num_scheduled_tokens == {"r": 30} and first.scheduled_encoder_inputs == {"r": [0]}
    second, second_outputs = step(scheduler, runner)
    assert second.num_scheduled_tokens == {"r": 30} and second.scheduled_encoder_inputs == {"r": [1]}
    assert second.free_encoder_mm_hashes == ["a"]  # evicted to make room for "b"
    outputs = merge_outputs({}, second_outputs)
    merge_outputs(outputs, run_to_completion(scheduler, runner))
    assert output_token_ids(outputs["r"]) == reference_tokens(request, 2)
    assert_all_blocks_free(scheduler)


def test_an_image_shared_by_eight_requests_is_encoded_once():
    scheduler = create_scheduler(block_size=4, encoder_budget=64)
    runner = make_runner(scheduler)
    requests = [create_request(f"r{i}", [100 + i] * 3 + [IMAGE_PAD_ID] * 12 + [200 + i] * 3,
                               mm_items=[make_mm_item("shared", 3, 12)], max_tokens=3) for i in range(8)]
    for request in requests:
        scheduler.add_request(request)
    first, first_outputs = step(scheduler, runner)
    assert len(first.num_scheduled_tokens) == 8
    assert first.scheduled_encoder_inputs == {"r0": [0]}
    assert scheduler.encoder_cache.entry_sizes == {"shared": 12}  # held once
    outputs = merge_outputs({}, first_outputs)
    merge_outputs(outputs, run_to_completion(scheduler, runner))
    assert runner.num_encoded == {"shared": 1}
    _assert_matches_reference(requests, outputs, 3)
    assert_all_blocks_free(scheduler)


def test_requests_that_can_never_fit_finish_with_error_and_others_continue():
    scheduler = create_scheduler(max_model_len=64, num_blocks=9, block_size=4, encoder_budget=10)
    ok = create_request("ok", [100] * 8, max_tokens=4)
    too_long = create_request("too_long", [100] * 64)
    too_big_for_kv = create_request("too_big_for_kv", [100] * 40)  # 8 blocks x 4 = 32 tokens
    too_big_image = create_request("too_big_image", [100] + [IMAGE_PAD_ID] * 12,
                                   mm_items=[make_mm_item("huge", 1, 12)])
    outputs = run_to_completion(scheduler, make_runner(scheduler),
                                [too_long, ok, too_big_for_kv, too_big_image])
    errors = {req_id: outs[-1].error for req_id, outs in outputs.items()
              if outs[-1].finish_reason == FinishReason.ERROR}
    assert set(errors) == {"too_long", "too_big_for_kv", "too_big_image"}
    assert "max_model_len=64" in errors["too_long"]
    assert "KV cache holds 32" in errors["too_big_for_kv"]
    assert "encoder budget of 10" in errors["too_big_image"]
    assert output_token_ids(outputs["ok"]) == reference_tokens(ok, 4)
    assert_all_blocks_free(scheduler)


def test_a_request_outgrowing_the_whole_kv_cache_finishes_with_error():
    scheduler = create_scheduler(max_model_len=100, num_blocks=9, block_size=4)
    outputs = run_to_completion(scheduler, make_runner(scheduler),
                                [create_request("r", [100] * 20, max_tokens=50)])
    assert outputs["r"][-1].finish_reason == FinishReason.ERROR
    assert "more than the KV cache holds (32 tokens)" in outputs["r"][-1].error
    assert len(output_token_ids(outputs["r"])) == 32 - 20 + 1  # the last one needs no slot
    assert_all_blocks_free(scheduler)


SCRIPT = [11, 12, EOS_TOKEN_ID, 13, EOS_TOKEN_ID, 14, 15, 16, 17, 18]


@pytest.mark.parametrize("sampling, expected, reason, stop_reason", [
    (dict(max_tokens=10), [11, 12, EOS_TOKEN_ID], FinishReason.STOP, None),
    (dict(max_tokens=6, ignore_eos=True), SCRIPT[:6], FinishReason.LENGTH, None),
    (dict(max_tokens=10, stop_token_ids=[12]), [11, 12], FinishReason.STOP, 12),
    (dict(max_tokens=10, min_tokens=4), SCRIPT[:5], FinishReason.STOP, None),
    (dict(max_tokens=10, min_tokens=4, stop_token_ids=[11, 13]), SCRIPT[:4], FinishReason.STOP, 13),
    (dict(max_tokens=2), [11, 12], FinishReason.LENGTH, None),
    (dict(max_tokens=None, ignore_eos=True), SCRIPT[:7], FinishReason.LENGTH, None),  # max_model_len
])
def test_stop_conditions(sampling, expected, reason, stop_reason):
    scheduler = create_scheduler(max_model_len=12, block_size=4)
    prompt = [100, 101, 102, 103, 104]
    runner = make_runner(scheduler, token_fn=lambda req_id, context: SCRIPT[len(context) - len(prompt)])
    outputs = run_to_completion(scheduler, runner, [create_request("r", prompt, **sampling)])
    assert output_token_ids(outputs["r"]) == expected
    assert (outputs["r"][-1].finish_reason, outputs["r"][-1].stop_reason) == (reason, stop_reason)
    assert_all_blocks_free(scheduler)


def test_prompt_logprobs_are_gathered_across_chunks_and_sent_once():
    scheduler = create_scheduler(max_num_batched_tokens=16, block_size=4)
    prompt = [100 + p for p in range(40)]
    request = create_request("r", prompt, max_tokens=3, prompt_logprobs=1, logprobs=1)
    outputs = run_to_completion(scheduler, make_runner(scheduler), [request])["r"]
    with_prompt_logprobs = [output for output in outputs if output.prompt_logprobs is not None]
    assert len(with_prompt_logprobs) == 1 and with_prompt_logprobs[0] is outputs[0]
    prompt_logprobs = outputs[0].prompt_logprobs
    assert len(prompt_logprobs) == 40 and prompt_logprobs[0] is None
    assert [entry.token_ids[0] for entry in prompt_logprobs[1:]] == prompt[1:]
    assert [entry.logprobs[0] for entry in prompt_logprobs[1:]] == [-p / 10 for p in range(1, 40)]
    assert all(len(output.new_logprobs) == 1 for output in outputs)
    assert_all_blocks_free(scheduler)


def test_a_runner_failure_finishes_only_that_request():
    scheduler = create_scheduler(block_size=4)
    runner = make_runner(scheduler, fail={"req1": "could not decode the image"})
    requests = create_requests(3, num_tokens=9, max_tokens=4)
    outputs = run_to_completion(scheduler, runner, requests)
    assert outputs["req1"] == [outputs["req1"][0]]
    assert outputs["req1"][0].finish_reason == FinishReason.ERROR
    assert outputs["req1"][0].error == "could not decode the image"
    _assert_matches_reference([requests[0], requests[2]], outputs, 4)
    assert_all_blocks_free(scheduler)


def test_step_stats_count_prompt_and_generated_tokens():
    scheduler = create_scheduler(block_size=4, num_blocks=11)
    runner = make_runner(scheduler)
    for request in create_requests(2, num_tokens=6, max_tokens=2):
        scheduler.add_request(request)
    scheduler_output = scheduler.schedule()
    stats = scheduler.update_from_output(scheduler_output, runner.execute(scheduler_output)).stats
    assert (stats.num_prompt_tokens, stats.num_generation_tokens) == (12, 2)
    assert (stats.num_running_reqs, stats.num_waiting_reqs) == (2, 0)
    assert (stats.num_total_blocks, stats.num_free_blocks) == (10, 10 - 4)
    assert stats.kv_cache_usage == pytest.approx(0.4)
    run_to_completion(scheduler, runner)
    assert_all_blocks_free(scheduler)
