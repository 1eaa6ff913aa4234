"""StructuredOutputManager with the real Scheduler and the tiny Qwen2 tokenizer, no model: grammars
compile off the step loop (a request waits without holding up others; a compile timeout or a bad
grammar fails only that request), bitmask rows only for requests that sample, the matcher follows
the accepted tokens and rolls back, EOS is allowed only where the grammar may end. Oracles: the
token strings themselves (hand-computed allowed sets), and the sampler's mask against a bit loop."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoTokenizer

from engine.protocol import FinishReason
from engine.runner_output import ModelRunnerOutput
from engine.sampler import apply_grammar_bitmask
from engine.structured_output import StructuredOutputsConfig, StructuredOutputsParams
from engine.structured_output.manager import StructuredOutputManager
from tests.engine.scheduler_fixtures import create_request, create_scheduler

EOS = 1032   # <|im_end|>: the tiny tokenizer's eos_token


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir("qwen2")))


def make_scheduler(tokenizer, **config):
    scheduler = create_scheduler(eos_token_ids=(EOS,), max_num_batched_tokens=config.pop("budget", 8192))
    scheduler.structured_output = StructuredOutputManager(StructuredOutputsConfig(**config), lambda: tokenizer, 1088)
    return scheduler


def structured(req_id: str, num_prompt_tokens: int = 8, **constraint):
    backend = constraint.pop("backend", "guidance")
    return create_request(req_id, list(range(100, 100 + num_prompt_tokens)),
                          structured_outputs=StructuredOutputsParams(**constraint, backend=backend))


def allowed_ids(bitmask_row: torch.Tensor) -> set[int]:
    return {32 * word + bit for word, value in enumerate(bitmask_row.tolist()) for bit in range(32) if value >> bit & 1}


def wait_compiled(request) -> None:
    request.structured_output.compiled.result(timeout=60)


def schedule(scheduler):
    """scheduler.schedule() with the step's grammar bitmask, built as engine.core does before sampling."""
    out = scheduler.schedule()
    out.grammar_bitmask = scheduler.get_grammar_bitmask(out)
    return out


def step(scheduler, tokens: dict[str, int]):
    """schedule, then feed one sampled token per request that samples."""
    out = schedule(scheduler)
    sampling = [r for r in out.num_scheduled_tokens
                if scheduler.requests[r].num_computed_tokens + out.num_scheduled_tokens[r] >= scheduler.requests[r].num_tokens]
    runner = ModelRunnerOutput(req_ids=sampling, sampled_token_ids=[[tokens[r]] for r in sampling])
    return out, scheduler.update_from_output(out, runner)


def test_a_request_waits_for_its_grammar_without_holding_up_others(tokenizer):
    scheduler = make_scheduler(tokenizer)
    release = threading.Event()
    compile_for_real = scheduler.structured_output._compile
    scheduler.structured_output._compile = lambda *args: (release.wait(30), compile_for_real(*args))[1]
    slow, plain = structured("slow", choice=["ab", "cd"]), create_request("plain", [5, 6, 7])
    scheduler.add_request(slow)
    scheduler.add_request(plain)
    out = schedule(scheduler)
    assert list(out.num_scheduled_tokens) == ["plain"] and out.grammar_bitmask is None
    assert list(scheduler.waiting) == [slow]
    release.set()
    wait_compiled(slow)
    out = schedule(scheduler)
    assert "slow" in out.num_scheduled_tokens and out.grammar_bitmask.req_ids == ["slow"]


def test_compile_timeout_and_bad_grammar_fail_only_that_request(tokenizer):
    scheduler = make_scheduler(tokenizer, compile_timeout_s=0.05)
    release = threading.Event()
    scheduler.structured_output._compile = lambda *args: release.wait(30)
    scheduler.add_request(structured("stuck", regex="a+"))
    time.sleep(0.1)
    scheduler.add_request(create_request("plain", [5, 6, 7]))
    out, outputs = step(scheduler, {"plain": 11})
    release.set()
    errors = {o.req_id: o.error for o in outputs.outputs if o.finish_reason == FinishReason.ERROR}
    assert "did not compile within 0.05 s" in errors["stuck"] and list(out.num_scheduled_tokens) == ["plain"]
    assert "stuck" not in scheduler.requests
    bad = make_scheduler(tokenizer)
    request = structured("bad", regex="a(b")
    bad.add_request(request)
    with pytest.raises(ValueError):
        wait_compiled(request)
    _, outputs = step(bad, {})
    assert "invalid grammar" in outputs.outputs[0].error and "unclosed group" in outputs.outputs[0].error
    assert bad.kv_cache_manager.get_num_free_blocks() == bad.kv_cache_manager.num_usable_blocks


def expected_choice_ids(tokenizer, choices: list[str], emitted: str) -> set[int]:
    """Token ids whose text continues `emitted` towards one of the choices (a hand-made oracle)."""
    remaining = [c[len(emitted):] for c in choices if c.startswith(emitted) and c != emitted]
    vocab = {i: tokenizer.decode([i]) for i in range(len(tokenizer))}
    return {i for i, text in vocab.items() if text and i != EOS and any(r.startswith(text) for r in remaining)}


@pytest.mark.parametrize("backend", ["guidance", "xgrammar"])
def test_bitmask_rows_follow_the_tokens_and_eos_only_at_the_end(tokenizer, backend):
    scheduler = make_scheduler(tokenizer, budget=8)
    choices = ["ab", "cd"]
    request = structured("r", num_prompt_tokens=12, choice=choices, backend=backend)
    scheduler.add_request(request)
    wait_compiled(request)
    out, _ = step(scheduler, {})
    assert out.num_scheduled_tokens == {"r": 8} and out.grammar_bitmask is None   # partial prefill: no sampling
    token_a, token_b = tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("b")
    out, _ = step(scheduler, {"r": token_a})
    assert allowed_ids(out.grammar_bitmask.bitmask[0]) == expected_choice_ids(tokenizer, choices, "")
    out, _ = step(scheduler, {"r": token_b})
    assert allowed_ids(out.grammar_bitmask.bitmask[0]) == expected_choice_ids(tokenizer, choices, "a")
    out = schedule(scheduler)
    assert allowed_ids(out.grammar_bitmask.bitmask[0]) == {EOS}   # "ab" is complete: only EOS
    scheduler.structured_output.rollback(request.structured_output, 1)
    again = scheduler.structured_output.grammar_bitmask([request], {"r": 1})
    assert allowed_ids(again.bitmask[0]) == expected_choice_ids(tokenizer, choices, "a")


def test_sampler_masks_only_the_grammar_rows():
    torch.manual_seed(0)
    logits = torch.randn(3, 70)
    bitmask = torch.randint(-2 ** 31, 2 ** 31 - 1, (2, 3), dtype=torch.int32)
    masked = apply_grammar_bitmask(logits.clone(), torch.tensor([2, 0]), bitmask)   # in place on the copy
    for row, mask_row in ((2, 0), (0, 1)):
        for token in range(70):
            allowed = int(bitmask[mask_row, token // 32]) >> (token % 32) & 1
            assert masked[row, token] == (logits[row, token] if allowed else float("-inf"))
    assert torch.equal(masked[1], logits[1])


def test_a_token_the_grammar_refuses_fails_the_request_instead_of_failing_open(tokenizer):
    scheduler = make_scheduler(tokenizer)
    request = structured("r", choice=["ab"])
    scheduler.add_request(request)
    wait_compiled(request)
    _, outputs = step(scheduler, {"r": tokenizer.convert_tokens_to_ids("c")})
    [output] = outputs.outputs
    assert output.finish_reason == FinishReason.ERROR and "refused a sampled token" in output.error
    assert "r" not in scheduler.requests
    assert scheduler.kv_cache_manager.get_num_free_blocks() == scheduler.kv_cache_manager.num_usable_blocks


@pytest.mark.parametrize("backend", ["guidance", "xgrammar"])
def test_rows_in_reused_buffers_equal_a_fresh_fill_and_terminated_rows_allow_everything(tokenizer, backend):
    scheduler = make_scheduler(tokenizer)
    requests = [structured(f"r{i}", choice=["ab", "cd"], backend=backend) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
        wait_compiled(request)
    token_a, token_c = tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("c")
    step(scheduler, {"r0": token_a, "r1": token_a, "r2": token_c})
    manager = scheduler.structured_output
    done = requests[1].structured_output
    assert manager.accept_tokens(done, [tokenizer.convert_tokens_to_ids("b"), EOS]) and done.matcher.is_terminated()
    num_scheduled = {r.req_id: 1 for r in requests}
    for _ in range(2):   # poison both buffers: every word of every row must be written
        manager.grammar_bitmask(requests, num_scheduled).bitmask.fill_(0x5A5A5A5A)
    built = manager.grammar_bitmask(requests, num_scheduled)
    fresh = torch.full_like(built.bitmask, -1)
    for row in (0, 2):
        requests[row].structured_output.matcher.fill_bitmask(fresh, row)
    assert built.req_ids == ["r0", "r1", "r2"] and torch.equal(built.bitmask, fresh)
    assert allowed_ids(built.bitmask[0]) == expected_choice_ids(tokenizer, ["ab", "cd"], "a")
    assert allowed_ids(built.bitmask[2]) == expected_choice_ids(tokenizer, ["ab", "cd"], "c")
    assert built.compact().bitmask.untyped_storage().nbytes() == fresh.numel() * 4


@pytest.mark.parametrize("backend,parallel", [("guidance", False), ("guidance", True), ("xgrammar", False)])
def test_accept_batch_gives_accept_tokens_verdicts_and_states(tokenizer, backend, parallel):
    """One step's tokens in one call (the scheduler's path) = each request's accept_tokens: the
    verdicts, the matchers' next rows, the rollback counts; a terminated matcher takes anything."""
    manager = make_scheduler(tokenizer).structured_output
    params = StructuredOutputsParams(choice=["ab", "cd"], backend=backend)
    batch, alone = ([manager.add_request(f"{name}{i}", params) for i in range(4)] for name in "ba")
    for state in batch + alone:
        state.compiled.result(timeout=60)
        assert manager.grammar_status(state) == "ready"
    if backend == "guidance":
        manager._backends["guidance"].parallel_accept = parallel
    a, b, c, d = (tokenizer.convert_tokens_to_ids(t) for t in "abcd")
    for states in (batch, alone):   # request 3 is past its grammar's end (ignore_eos)
        assert manager.accept_tokens(states[3], [c, d, EOS]) and states[3].matcher.is_terminated()
    verdicts = []   # refused: b first (request 2), a after c (request 1); request 0 ends with EOS
    for tokens in ([a, c, b, 7], [b, a, EOS, 9], [EOS, d, a, 5]):
        verdicts.append(manager.accept_batch(batch, tokens))
        assert verdicts[-1] == [manager.accept_tokens(state, [token]) for state, token in zip(alone, tokens)]
    # (requests 1 and 2 after their refusal are left to the library: they have failed in the engine)
    assert [[step[i] for i in (0, 1, 3)] for step in verdicts[:2]] == [[True, True, True], [True, False, True]]
    assert verdicts[2][0] and verdicts[2][3]
    assert [s.num_accepted_tokens for s in batch] == [s.num_accepted_tokens for s in alone]
    assert [batch[i].num_accepted_tokens for i in (0, 3)] == [3, 3]
    assert [s.matcher.is_terminated() for s in batch] == [s.matcher.is_terminated() for s in alone]
    assert batch[0].matcher.is_terminated() and not batch[1].matcher.is_terminated()
    row = manager.grammar_bitmask([_Req(batch[0])], {"x": 1}).bitmask
    assert bool((row == -1).all())   # a terminated matcher's row allows everything


class _Req:
    """What grammar_bitmask reads of an engine.request.Request (one that samples this step)."""

    def __init__(self, state) -> None:
        self.req_id, self.structured_output, self.num_computed_tokens, self.num_tokens = "x", state, 1, 1


def test_one_refused_token_in_a_batched_step_fails_only_its_request(tokenizer):
    scheduler = make_scheduler(tokenizer)
    requests = [structured(f"r{i}", choice=["ab"]) for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
        wait_compiled(request)
    a, c = tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("c")
    _, outputs = step(scheduler, {"r0": a, "r1": c, "r2": a})
    by_id = {output.req_id: output for output in outputs.outputs}
    assert by_id["r1"].finish_reason == FinishReason.ERROR and "refused a sampled token" in by_id["r1"].error
    assert by_id["r0"].finish_reason is None and by_id["r2"].finish_reason is None
    assert sorted(scheduler.requests) == ["r0", "r2"]
    assert [r.structured_output.num_accepted_tokens for r in (requests[0], requests[2])] == [1, 1]
