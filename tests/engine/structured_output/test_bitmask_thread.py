"""The grammar bitmask built in the manager's fill thread (async scheduling: started right after the
matchers accept a step's tokens, joined where the next step samples). Oracles: the inline build of
the same matchers (bit for bit), the order of fills and matcher moves recorded by wrappers that
fail on any overlap, and engine runs whose fake model samples the lowest token each row allows (a
stale or raced row makes the grammar refuse a token, an ERROR output, or changes the text)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.protocol import EngineRequest, FinishReason
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutputsParams
from engine.structured_output.backends import GuidanceBackend, GuidanceMatcher, XgrammarBackend, XgrammarMatcher
from tests.engine.scheduler_fixtures import assert_all_blocks_free
from tests.engine.structured_output.test_structured_manager import EOS, make_scheduler, step, structured, wait_compiled
from tests.engine.structured_output.test_structured_step import make_core, tokenizer  # noqa: F401 - fixture

FILL_THREAD = "grammar-bitmask"


def fill_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith(FILL_THREAD)]


def ready_requests(tokenizer, backend: str):
    """A scheduler with 5 constrained requests that each sampled once (various grammar states)."""
    scheduler = make_scheduler(tokenizer)
    requests = [structured("c0", choice=["ab", "cd"], backend=backend),
                structured("c1", choice=["ab", "cd"], backend=backend),
                structured("r2", regex="[a-c]{2,6}x", backend=backend),
                structured("j3", json={"type": "object", "properties": {"n": {"type": "integer"}}}, backend=backend),
                structured("c4", choice=["abcd", "ab"], backend=backend)]
    for request in requests:
        scheduler.add_request(request)
        wait_compiled(request)
    a, c, brace = (tokenizer.convert_tokens_to_ids(t) for t in ("a", "c", "{"))
    step(scheduler, {"c0": a, "c1": c, "r2": a, "j3": brace, "c4": a})
    return scheduler, requests


@pytest.mark.parametrize("backend", ["guidance", "xgrammar"])
def test_the_threaded_build_equals_the_inline_build(tokenizer, backend):
    scheduler, requests = ready_requests(tokenizer, backend)
    manager = scheduler.structured_output
    b = tokenizer.convert_tokens_to_ids("b")
    assert manager.accept_tokens(requests[0].structured_output, [b, EOS])   # terminated: its row allows all
    for _ in range(3):   # both buffers in turn
        manager.start_bitmask(requests)
        threaded = manager.take_bitmask()
        inline = manager.grammar_bitmask(requests, {r.req_id: 1 for r in requests})
        assert threaded.req_ids == inline.req_ids == [r.req_id for r in requests]
        assert torch.equal(threaded.bitmask, inline.bitmask)
        assert threaded.bitmask.data_ptr() != inline.bitmask.data_ptr()   # the two buffers alternate
    assert (threaded.bitmask[0] == -1).all() and not (threaded.bitmask[1] == -1).all()
    assert manager.take_bitmask() is None   # taken once


@pytest.mark.parametrize("backend", ["guidance", "xgrammar"])
@pytest.mark.parametrize("move", ["accept_batch", "accept_tokens", "rollback"])
def test_a_matcher_never_moves_while_a_fill_runs(tokenizer, backend, move, monkeypatch):
    """A slow fill (50 ms) is in flight when a matcher moves: the move waits for it, and the taken
    bitmask is built again from the moved matchers (equal to the inline build after the move)."""
    scheduler, requests = ready_requests(tokenizer, backend)
    manager = scheduler.structured_output
    events: list[str] = []
    backend_class, matcher_class = ((GuidanceBackend, GuidanceMatcher) if backend == "guidance"
                                    else (XgrammarBackend, XgrammarMatcher))
    real_fill = backend_class.fill_bitmasks

    def slow_fill(self, rows, bitmask):
        events.append("fill start")
        time.sleep(0.05)
        real_fill(self, rows, bitmask)
        events.append("fill end")

    def recorded(method):
        def moving(*args, **kwargs):
            events.append(method.__name__)
            return method(*args, **kwargs)
        return moving

    monkeypatch.setattr(backend_class, "fill_bitmasks", slow_fill)
    for name in ("accept_token", "rollback"):
        monkeypatch.setattr(matcher_class, name, recorded(getattr(matcher_class, name)))
    monkeypatch.setattr(backend_class, "accept_batch", recorded(backend_class.accept_batch))
    b = tokenizer.convert_tokens_to_ids("b")
    manager.start_bitmask(requests)
    if move == "accept_batch":
        assert manager.accept_batch([requests[0].structured_output], [b]) == [True]
    elif move == "accept_tokens":
        assert manager.accept_tokens(requests[4].structured_output, [b])
    else:
        manager.rollback(requests[1].structured_output, 1)   # "c" taken back: the row changes
    assert events[:2] == ["fill start", "fill end"] and events[2] in ("accept_batch", "accept_token", "rollback")
    threaded = manager.take_bitmask()   # stale: built again, inline
    inline = manager.grammar_bitmask(requests, {r.req_id: 1 for r in requests})
    assert torch.equal(threaded.bitmask, inline.bitmask)


def test_shutdown_joins_a_fill_in_flight(tokenizer, monkeypatch):
    scheduler, requests = ready_requests(tokenizer, "guidance")
    manager = scheduler.structured_output
    real_fill = GuidanceBackend.fill_bitmasks
    monkeypatch.setattr(GuidanceBackend, "fill_bitmasks",
                        lambda self, rows, bitmask: (time.sleep(0.05), real_fill(self, rows, bitmask)))
    others = set(fill_threads())   # other tests' managers, not shut down
    manager.start_bitmask(requests)
    ours = set(fill_threads()) - others
    assert len(ours) == 1
    manager.shutdown()
    assert not [thread for thread in ours if thread.is_alive()]


LETTERS = "abcdefgh"
# Request i's choices: a row given to the wrong request makes the grammar refuse a token.
CHOICES = [[LETTERS[i:] + LETTERS[:i], LETTERS[i] + "xyz"] for i in range(8)]


def run_with_aborts(core, tokenizer, abort_at_step: int | None) -> tuple[dict, int]:
    """8 grammar requests (both backends, prompts long enough to preempt each other in a small KV
    cache) and 2 unconstrained; at `abort_at_step`, while a bitmask build is in flight, abort two
    grammar requests whose rows it fills. -> ({req_id: (text, finish_reason)}, builds started)."""
    manager = core.scheduler.structured_output
    num_starts = [0]
    real_start = manager.start_bitmask
    manager.start_bitmask = lambda rows: (num_starts.__setitem__(0, num_starts[0] + 1), real_start(rows))[1]
    for i in range(8):
        backend = "guidance" if i % 2 else "xgrammar"
        params = SamplingParams(temperature=0.0, max_tokens=12,
                                structured_outputs=StructuredOutputsParams(choice=CHOICES[i], backend=backend))
        core.add_request(EngineRequest(f"g{i}", list(range(100, 120 + 3 * i)), params))
    for i in range(2):
        core.add_request(EngineRequest(f"plain{i}", [5, 6, 7 + i], SamplingParams(temperature=0.0, max_tokens=9,
                                                                               ignore_eos=True)))
    for request in list(core.scheduler.requests.values()):
        if request.structured_output is not None:
            request.structured_output.compiled.result(timeout=60)
    tokens: dict[str, list[int]] = {}
    finished: dict[str, FinishReason] = {}
    aborted: list[str] = []
    for step_index in range(400):
        if not core.has_unfinished_requests():
            break
        for output in core.step().outputs:
            assert output.finish_reason != FinishReason.ERROR, output.error
            assert output.req_id not in aborted, "an output after the abort"
            tokens.setdefault(output.req_id, []).extend(output.new_token_ids)
            if output.finish_reason is not None:
                finished[output.req_id] = output.finish_reason
        build = manager._build
        if step_index >= (abort_at_step or 10 ** 9) and not aborted and build is not None:
            aborted = [r.req_id for r in build.requests if r.req_id not in finished][:2]
            assert len(aborted) == 2
            core.abort_requests(aborted)
    assert not core.has_unfinished_requests()
    assert_all_blocks_free(core.scheduler)
    results = {req_id: (tokenizer.decode([t for t in ids if t != EOS]), finished.get(req_id))
               for req_id, ids in tokens.items() if req_id not in aborted}
    return results, num_starts[0]


def test_async_grammar_steps_with_aborts_and_preemption_in_flight(tokenizer):
    """Under async scheduling the builds run in the fill thread (every decode step); requests are
    preempted and aborted while their rows are being filled: the texts equal the synchronous run's,
    nothing errs, no block or request is left, and no fill thread outlives shutdown."""
    sync_core, _ = make_core(tokenizer, async_scheduling=False, num_blocks=24)
    expected, sync_starts = run_with_aborts(sync_core, tokenizer, abort_at_step=None)
    sync_core.shutdown()
    assert sync_starts == 0 and sync_core.scheduler.num_preemptions > 0
    for name, (text, reason) in expected.items():
        assert (text in CHOICES[int(name[1:])] and reason == FinishReason.STOP if name.startswith("g")
                else reason == FinishReason.LENGTH)
    others = set(fill_threads())
    core, _ = make_core(tokenizer, async_scheduling=True, num_blocks=24)
    results, num_starts = run_with_aborts(core, tokenizer, abort_at_step=6)
    assert num_starts >= 8 and core.scheduler.num_preemptions > 0
    assert len(results) == len(expected) - 2 and all(results[r] == expected[r] for r in results)
    ours = set(fill_threads()) - others
    assert len(ours) == 1
    core.shutdown()
    assert not [thread for thread in ours if thread.is_alive()]
