"""The split step of structured outputs, EngineCore with a fake split-step executor (no model) and
the tiny Qwen2 tokenizer: the core launches the forward (execute_model), then builds the grammar
bitmask, then samples with it (sample_tokens); under async scheduling a grammar request no longer
makes the core wait for the step in flight before launching the next forward, and the bitmask of
step N+1 still follows step N's token. Oracle: the fake samples the lowest token each bitmask row
allows, so a stale row makes the grammar refuse a token (an ERROR output) or the text leave the
choices; the outputs must be exactly the choices' texts."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoTokenizer

from engine.config import (CacheConfig, DeviceConfig, EngineConfig, ModelConfig, MultiModalConfig,
                           ParallelConfig, SchedulerConfig)
from engine.core import EngineCore
from engine.protocol import EngineRequest, FinishReason
from engine.runner_output import ModelRunnerOutput
from engine.sampling_params import SamplingParams
from engine.scheduler_output import GrammarBitmask, SchedulerOutput
from engine.structured_output import StructuredOutputsConfig, StructuredOutputsParams
from engine.structured_output.manager import StructuredOutputManager
from tests.engine.scheduler_fixtures import FakeRunner, assert_all_blocks_free, default_token_fn

EOS, VOCAB = 1032, 1088   # the tiny tokenizer's <|im_end|> and its width
CHOICES = ["ab", "cd", "abcd"]


def allowed_ids(bitmask_row: torch.Tensor) -> set[int]:
    return {32 * word + bit for word, value in enumerate(bitmask_row.tolist()) for bit in range(32) if value >> bit & 1}


@dataclass
class _Ready:
    output: ModelRunnerOutput
    events: list

    def result(self) -> ModelRunnerOutput:
        self.events.append("result")
        return self.output


@dataclass
class SplitFakeRunner(FakeRunner):
    """FakeRunner as a split-step executor; a grammar row samples the lowest allowed token."""

    events: list = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.token_fn = self._token
        self._launched: SchedulerOutput | None = None
        self._allowed: dict[str, set[int]] = {}

    def _token(self, req_id: str, context: list) -> int:
        return min(self._allowed[req_id]) if req_id in self._allowed else default_token_fn(req_id, context)

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        assert self._launched is None, "execute_model twice without sample_tokens"
        self.events.append("execute_model")
        self.scheduler_outputs.append(scheduler_output)
        self._update_states(scheduler_output)
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            self._write_kv(req_id, num_tokens)
        self._launched = scheduler_output

    def sample_tokens(self, grammar_bitmask: GrammarBitmask | None) -> _Ready:
        scheduler_output, self._launched = self._launched, None
        assert scheduler_output is not None and scheduler_output.grammar_bitmask is None
        rows = grammar_bitmask.req_ids if grammar_bitmask is not None else []
        self.events.append(("sample_tokens", tuple(rows)))
        self._allowed = {req_id: allowed_ids(grammar_bitmask.bitmask[row]) for row, req_id in enumerate(rows)}
        output = ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            self._sample(req_id, num_tokens, output)
        return _Ready(output, self.events)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir("qwen2")))


def make_core(tokenizer, async_scheduling: bool, num_blocks: int = 64) -> tuple[EngineCore, SplitFakeRunner]:
    model = ModelConfig(model="fake", path="/nonexistent", architecture="Fake", hf_config={"vocab_size": VOCAB},
                        dtype=torch.float32, max_model_len=64, tokenizer="fake", eos_token_ids=(EOS,))
    config = EngineConfig(model, CacheConfig(block_size=4, num_gpu_blocks_override=num_blocks),
                          SchedulerConfig(max_model_len=64, max_num_batched_tokens=16, async_scheduling=async_scheduling),
                          ParallelConfig(), DeviceConfig(), MultiModalConfig())
    runner = SplitFakeRunner(num_blocks, 4)
    core = EngineCore(config, runner=runner)
    core.scheduler.structured_output = StructuredOutputManager(StructuredOutputsConfig(), lambda: tokenizer, VOCAB)
    return core, runner


def run(core: EngineCore, tokenizer) -> dict[str, tuple[str, FinishReason]]:
    """Three grammar requests (one with a prompt cut in chunks) and one unconstrained, to the end."""
    for i in range(3):
        params = SamplingParams(temperature=0.0, max_tokens=10, structured_outputs=StructuredOutputsParams(choice=CHOICES))
        core.add_request(EngineRequest(f"g{i}", list(range(100, 106 + 12 * i)), params))
    core.add_request(EngineRequest("plain", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)))
    for i in range(3):   # compiled before the first step: the steps below are then all of one kind
        core.scheduler.requests[f"g{i}"].structured_output.compiled.result(timeout=60)
    tokens: dict[str, list[int]] = {}
    finished = {}
    for _ in range(200):
        if not core.has_unfinished_requests():
            break
        for output in core.step().outputs:
            assert output.finish_reason != FinishReason.ERROR, output.error
            tokens.setdefault(output.req_id, []).extend(output.new_token_ids)
            if output.finish_reason is not None:
                finished[output.req_id] = output.finish_reason
    assert_all_blocks_free(core.scheduler)
    return {req_id: (tokenizer.decode([t for t in ids if t != EOS]), finished[req_id]) for req_id, ids in tokens.items()}


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_bitmask_is_built_between_the_forward_and_sampling(tokenizer, async_scheduling):
    core, runner = make_core(tokenizer, async_scheduling)
    assert core.async_scheduling == async_scheduling
    results = run(core, tokenizer)
    for i in range(3):
        text, reason = results[f"g{i}"]
        assert text in CHOICES and reason == FinishReason.STOP
    assert results["plain"][1] == FinishReason.LENGTH
    launches = [e for e in runner.events if e != "result"]
    assert launches[0::2] == ["execute_model"] * (len(launches) // 2)   # always forward, then sampling
    assert any(rows for _, rows in launches[1::2])
    if async_scheduling:
        # overlap: a step's tokens are read after the next forward was launched, before its sampling
        overlapped = [i for i, e in enumerate(runner.events[1:-1], 1)
                      if e == "result" and runner.events[i - 1] == "execute_model"]
        assert len(overlapped) >= 5
