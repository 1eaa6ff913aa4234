"""Model-free helpers for the scheduler / KV-cache / core tests (like vLLM's tests/v1/core/utils.py).

FakeRunner plays the model runner against a *simulated paged KV cache*: every computed position
writes its content (token id, or (mm_hash, row) for a placeholder position, which requires the
embedding to be in its encoder cache) into slot block_id * B + offset, and the next token is a
hash of the context it reads back through the block table. Wrong block tables, a prefix hit on
the wrong blocks, a missing encoder output or a bad recompute after preemption therefore change
the generated tokens, which the tests compare with `reference_tokens` (the same function applied
to the true sequence, no engine involved).
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field

from engine.config import SchedulerConfig
from engine.encoder_cache import EncoderCacheManager
from engine.kv_cache.manager import KVCacheManager
from engine.protocol import EngineOutput, TokenLogprobs
from engine.request import Request
from engine.runner_output import ModelRunnerOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import SchedulerOutput
from vision.inputs import MultiModalItem, PlaceholderRange

EOS_TOKEN_ID = 2
IMAGE_PAD_ID = 7
VOCAB_SIZE = 1000


def context_token(context: list) -> int:
    """The fake model: next token = stable hash of the whole context, never below 10 (no EOS)."""
    return 10 + zlib.crc32(repr(context).encode()) % (VOCAB_SIZE - 10)


def default_token_fn(req_id: str, context: list) -> int:
    return context_token(context)


def make_mm_item(mm_hash: str, offset: int, length: int, modality: str = "image") -> MultiModalItem:
    return MultiModalItem(modality=modality, mm_hash=mm_hash,
                          placeholder=PlaceholderRange(offset=offset, length=length),
                          frames=b"", frames_shape=(1, 1, 1, 3), grid_thw=(1, 1, 1))


def create_request(req_id: str, prompt_token_ids: list[int], *, mm_items=(), cache_salt=None,
                   **sampling_kwargs) -> Request:
    sampling_kwargs.setdefault("max_tokens", 8)
    return Request(req_id, prompt_token_ids, SamplingParams(**sampling_kwargs).validate(),
                   mm_items=list(mm_items), cache_salt=cache_salt)


def create_requests(num_requests: int, num_tokens: int = 20, *, same_prompt: bool = False,
                    prefix: str = "req", **kwargs) -> list[Request]:
    requests = []
    for index in range(num_requests):
        start = 0 if same_prompt else 100 + 37 * index
        prompt = [100 + (start + position) % 800 for position in range(num_tokens)]
        requests.append(create_request(f"{prefix}{index}", prompt, **kwargs))
    return requests


def create_scheduler(*, max_num_seqs: int = 16, max_num_batched_tokens: int = 8192,
                     num_blocks: int = 1000, block_size: int = 16, enable_prefix_caching: bool = True,
                     max_model_len: int = 4096, encoder_budget: int = 4096,
                     encoder_cache_size: int | None = None, enable_chunked_prefill: bool = True,
                     eos_token_ids: tuple[int, ...] = (EOS_TOKEN_ID,)) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             enable_chunked_prefill=enable_chunked_prefill, max_model_len=max_model_len)
    return Scheduler(config, KVCacheManager(num_blocks, block_size, enable_prefix_caching),
                     EncoderCacheManager(encoder_cache_size or encoder_budget),
                     eos_token_ids=eos_token_ids, max_model_len=max_model_len,
                     encoder_compute_budget=encoder_budget)


def sequence_contents(token_ids: list[int], mm_items) -> list:
    """What the KV of each position depends on: the token, or the embedding row of an item."""
    contents: list = list(token_ids)
    for item in mm_items:
        for row in range(item.placeholder.length):
            contents[item.placeholder.offset + row] = (item.mm_hash, row)
    return contents


def reference_tokens(request: Request, num_output_tokens: int, token_fn=default_token_fn) -> list[int]:
    contents = sequence_contents(request.prompt_token_ids, request.mm_items)
    output = []
    for _ in range(num_output_tokens):
        output.append(token_fn(request.req_id, contents))
        contents = contents + [output[-1]]
    return output


@dataclass
class _RunnerRequest:
    token_ids: list[int]
    mm_items: list[MultiModalItem]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    num_prompt_tokens: int


@dataclass
class FakeRunner:
    num_blocks: int
    block_size: int
    token_fn: object = default_token_fn
    fail: dict[str, str] = field(default_factory=dict)  # req_id -> error message to report
    num_blocks_for_memory_value: int = 64

    def __post_init__(self) -> None:
        self.kv_slots: list = [None] * (self.num_blocks * self.block_size)
        self.requests: dict[str, _RunnerRequest] = {}
        self.encoder_cache: dict[str, MultiModalItem] = {}
        self.num_encoded: Counter[str] = Counter()
        self.scheduler_outputs: list[SchedulerOutput] = []
        self.initialized_num_blocks: int | None = None

    # The two calls EngineCore makes at start-up.
    def num_blocks_for_memory(self) -> int:
        return self.num_blocks_for_memory_value

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.initialized_num_blocks = num_blocks

    def shutdown(self) -> None:
        pass

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.scheduler_outputs.append(scheduler_output)
        self._update_states(scheduler_output)
        for req_id, input_ids in scheduler_output.scheduled_encoder_inputs.items():
            for input_id in input_ids:
                item = self.requests[req_id].mm_items[input_id]
                assert item.mm_hash not in self.encoder_cache, "encoded an item that is cached"
                self.encoder_cache[item.mm_hash] = item
                self.num_encoded[item.mm_hash] += 1
        output = ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            self._write_kv(req_id, num_tokens)  # every layer stores K/V before attending
        for req_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            self._sample(req_id, num_tokens, output)
        return output

    def _update_states(self, scheduler_output: SchedulerOutput) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
        for mm_hash in scheduler_output.free_encoder_mm_hashes:
            del self.encoder_cache[mm_hash]
        for new in scheduler_output.scheduled_new_reqs:
            assert 0 not in new.block_ids, "the null block was handed out"
            self.requests[new.req_id] = _RunnerRequest(
                new.prompt_token_ids + new.output_token_ids, new.mm_items, new.sampling_params,
                list(new.block_ids), new.num_computed_tokens, len(new.prompt_token_ids))
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, new_block_ids, num_computed in zip(cached.req_ids, cached.new_block_ids,
                                                       cached.num_computed_tokens):
            state = self.requests[req_id]
            assert state.num_computed_tokens == num_computed, (req_id, state.num_computed_tokens)
            assert 0 not in new_block_ids, "the null block was handed out"
            state.block_ids.extend(new_block_ids)

    def _slot(self, state: _RunnerRequest, position: int) -> int:
        return state.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def _write_kv(self, req_id: str, num_tokens: int) -> None:
        state = self.requests[req_id]
        start = state.num_computed_tokens
        assert start + num_tokens <= len(state.token_ids), "scheduled unknown tokens"
        assert start + num_tokens <= len(state.block_ids) * self.block_size, "too few blocks"
        contents = sequence_contents(state.token_ids, state.mm_items)
        for position in range(start, start + num_tokens):
            if isinstance(contents[position], tuple):
                assert contents[position][0] in self.encoder_cache, "embedding not encoded"
            self.kv_slots[self._slot(state, position)] = contents[position]
        state.num_computed_tokens += num_tokens

    def _sample(self, req_id: str, num_tokens: int, output: ModelRunnerOutput) -> None:
        state = self.requests[req_id]
        output.req_ids.append(req_id)
        if req_id in self.fail:
            output.failed[req_id] = self.fail[req_id]
            output.sampled_token_ids.append([])
            return
        if state.sampling_params.prompt_logprobs is not None:
            output.prompt_logprobs[req_id] = self._prompt_logprobs(state, num_tokens)
        if state.num_computed_tokens < len(state.token_ids):
            output.sampled_token_ids.append([])  # partial prefill
            return
        context = [self.kv_slots[self._slot(state, p)] for p in range(state.num_computed_tokens)]
        token_id = self.token_fn(req_id, context)
        state.token_ids.append(token_id)
        output.sampled_token_ids.append([token_id])
        if state.sampling_params.logprobs is not None:
            output.logprobs[req_id] = [TokenLogprobs([token_id], [-0.25], [1])]

    @staticmethod
    def _prompt_logprobs(state: _RunnerRequest, num_tokens: int) -> list[TokenLogprobs]:
        """vLLM's convention: a chunk [c, c+n) scores prompt tokens c+1 .. min(c+n, P-1)."""
        end = state.num_computed_tokens  # already advanced by _write_kv
        first = end - num_tokens + 1
        return [TokenLogprobs([state.token_ids[p]], [-p / 10], [1])
                for p in range(first, min(end, state.num_prompt_tokens - 1) + 1)]


def make_runner(scheduler: Scheduler, **kwargs) -> FakeRunner:
    manager = scheduler.kv_cache_manager
    return FakeRunner(manager.block_pool.num_blocks, manager.block_size, **kwargs)


def step(scheduler: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[EngineOutput]]:
    scheduler_output = scheduler.schedule()
    assert scheduler_output.total_num_scheduled_tokens <= scheduler.max_num_batched_tokens
    assert len(scheduler_output.num_scheduled_tokens) <= scheduler.max_num_seqs
    engine_outputs = scheduler.update_from_output(scheduler_output, runner.execute(scheduler_output))
    return scheduler_output, engine_outputs.outputs


def run_to_completion(scheduler: Scheduler, runner: FakeRunner, requests=(), max_steps: int = 2000
                      ) -> dict[str, list[EngineOutput]]:
    for request in requests:
        scheduler.add_request(request)
    outputs: dict[str, list[EngineOutput]] = {}
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return outputs
        merge_outputs(outputs, step(scheduler, runner)[1])
    raise AssertionError(f"not finished after {max_steps} steps")


def merge_outputs(into: dict[str, list[EngineOutput]], outputs) -> dict[str, list[EngineOutput]]:
    """Add a step's outputs (a list) or a run's (a dict) to `into`, per request, in order."""
    items = outputs.values() if isinstance(outputs, dict) else [[output] for output in outputs]
    for group in items:
        for output in group:
            into.setdefault(output.req_id, []).append(output)
    return into


def output_token_ids(outputs: list[EngineOutput]) -> list[int]:
    return [token_id for output in outputs for token_id in output.new_token_ids]


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    manager = scheduler.kv_cache_manager
    assert manager.get_num_free_blocks() == manager.num_usable_blocks
    assert not manager.req_to_blocks and not manager.num_cached_blocks
    assert all(block.ref_cnt == 0 for block in manager.block_pool.blocks[1:])
    assert not any(scheduler.encoder_cache.referenced_by.values()), "encoder entries still referenced"
    assert not scheduler.requests and not scheduler.running and not scheduler.waiting
