"""Scheduler: who runs this step and how many tokens each computes (admission, the queues,
preemption); turning the runner's sampled tokens back into request state and outputs is
engine.scheduler_update. Caller: engine.core.EngineCore (schedule -> runner.execute ->
update_from_output). Touches no tensor: it hands the runner a SchedulerOutput.

There is no prefill or decode phase (DESIGN rule 4). Every request has `num_computed_tokens`
catching up to `num_tokens`; each step gives it up to `max_num_batched_tokens` tokens of budget.
A decode is a request 1 token behind, a prefill chunk one many tokens behind, a prefix-cache hit
starts it ahead, a preemption resets it to 0. Running requests (FCFS) are served first, then
waiting ones. When KV blocks run out, the newest running request is preempted (blocks freed,
recomputed later from the front of the waiting queue).

Encoder inputs follow the tokens: a step covering [start, end) of a request encodes every
multimodal item whose placeholder overlaps it and is not in the encoder cache; when the encoder
budget or cache cannot take one, the chunk is cut before that placeholder. A chunk may end inside
a placeholder run: the runner slices the cached embedding.
"""

# Be paranoid about adding new lines to this file. Every step of every request runs through it;
# a new policy is a new helper or class, not another branch in schedule() (DESIGN rules 4-5).

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import engine.beam_groups as beam_groups
import engine.scheduler_update as scheduler_update
from engine.config import SchedulerConfig
from engine.encoder_cache import EncoderCacheManager
from engine.kv_cache.manager import KVCacheManager
from engine.protocol import EngineOutput, EngineOutputs, FinishReason, SchedulerStats
from engine.request import Request, RequestStatus
from engine.runner_output import ModelRunnerOutput
from engine.scheduler_output import CachedRequestData, GrammarBitmask, NewRequestData, SchedulerOutput
from engine.structured_output.manager import COMPILING, READY, StructuredOutputManager


@dataclass
class _StepBudget:
    num_tokens: int
    num_encoder_tokens: int


@dataclass
class _StepPlan:
    new_reqs: list[Request] = field(default_factory=list)
    cached_reqs: list[Request] = field(default_factory=list)
    new_block_ids: dict[str, list[int]] = field(default_factory=dict)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    encoder_inputs: dict[str, list[int]] = field(default_factory=dict)
    has_preempted: bool = False


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, kv_cache_manager: KVCacheManager,
                 encoder_cache_manager: EncoderCacheManager, *, eos_token_ids: tuple[int, ...],
                 max_model_len: int, encoder_compute_budget: int,
                 structured_output_manager: StructuredOutputManager | None = None) -> None:
        self._init_limits(scheduler_config, max_model_len, encoder_compute_budget, eos_token_ids)
        self.kv_cache_manager = kv_cache_manager
        self.encoder_cache = encoder_cache_manager
        self.structured_output = structured_output_manager
        self._init_queues()

    def _init_limits(self, scheduler_config: SchedulerConfig, max_model_len: int,
                     encoder_compute_budget: int, eos_token_ids: tuple[int, ...]) -> None:
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.enable_chunked_prefill = scheduler_config.enable_chunked_prefill
        self.max_model_len = max_model_len
        self.encoder_compute_budget = encoder_compute_budget
        self.eos_token_ids = frozenset(eos_token_ids)

    def _init_queues(self) -> None:
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Left the running set since the last schedule(): the runner drops their state.
        self.finished_req_ids: set[str] = set()
        # Outputs decided outside a step (requests rejected at admission), sent with the next one.
        self.pending_outputs: list[EngineOutput] = []
        self.beam_groups: dict[str, beam_groups.BeamGroup] = {}   # beam search: by user request id
        self.num_preemptions = 0
        # [structured outputs] The step whose bitmask the manager's fill thread builds (async scheduling).
        self._grammar_bitmask_step: SchedulerOutput | None = None
        self._step_prompt_tokens = 0
        self._step_generation_tokens = 0

    # ---------------------------------------------------------------- admission and abort

    def add_request(self, request: Request) -> None:
        error = self._why_never_schedulable(request)
        if error is not None:
            self.reject(request.req_id, error)
            return
        if request.use_structured_output:   # [structured outputs] starts compiling its grammar
            request.structured_output = self.structured_output.add_request(
                request.req_id, request.sampling_params.structured_outputs)
        self.requests[request.req_id] = request
        self.waiting.append(request)
        if request.sampling_params.use_beam_search:   # beam search: this is the group's leader
            beam_groups.start_beam_group(self, request)

    def reject(self, req_id: str, message: str) -> None:
        """Send FinishReason.ERROR for a request that is out of the queues (or never entered)."""
        self.pending_outputs.append(EngineOutput(
            req_id=req_id, new_token_ids=[], finish_reason=FinishReason.ERROR, error=message))

    def _why_never_schedulable(self, request: Request) -> str | None:
        num_prompt_tokens = request.num_prompt_tokens
        if num_prompt_tokens + 1 > self.max_model_len:
            return (f"The prompt has {num_prompt_tokens} tokens; with one generated token that "
                    f"exceeds the maximum context length (max_model_len={self.max_model_len}).")
        if num_prompt_tokens > self.kv_cache_manager.max_num_tokens:
            return (f"The prompt has {num_prompt_tokens} tokens but the whole KV cache holds "
                    f"{self.kv_cache_manager.max_num_tokens}.")
        if request.use_structured_output and self.structured_output is None:
            return "structured outputs are not available in this engine"
        limit = min(self.encoder_compute_budget, self.encoder_cache.cache_size)
        for item in request.mm_items:
            if item.placeholder.length > limit:
                return (f"A {item.modality} item needs {item.placeholder.length} embedding tokens, "
                        f"more than the encoder budget of {limit}; use a smaller {item.modality}.")
        return None

    def abort_requests(self, req_ids: list[str]) -> None:
        """Finish the requests now and free their blocks. No output: the client asked for it."""
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.beam_group is not None:   # beam search: the whole group
                beam_groups.finish_beam_group(self, request.beam_group, RequestStatus.FINISHED_ABORTED)
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._free_request(request, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.pending_outputs)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput:
        budget = _StepBudget(self.max_num_batched_tokens, self.encoder_compute_budget)
        plan = _StepPlan()
        self._schedule_running(budget, plan)
        if not plan.has_preempted:  # memory is short: admit nobody new this step
            self._schedule_waiting(budget, plan)
        return self._make_scheduler_output(plan)

    def _schedule_running(self, budget: _StepBudget, plan: _StepPlan) -> None:
        # Runs for every running request every step: attributes, not properties; media and
        # the async end-of-request check are skipped at one test each.
        index = 0
        while index < len(self.running) and budget.num_tokens > 0:
            request = self.running[index]
            start = request.num_computed_tokens + request.num_inflight_tokens
            num_new_tokens = min(len(request.all_token_ids) + request.num_output_placeholders - start,
                                 budget.num_tokens)
            if request.num_output_placeholders and self._ends_with_placeholder(request):
                num_new_tokens = 0   # the token on the device finishes it: nothing to compute after
            encoder_inputs: list[int] = []
            if request.media_end > start:
                num_new_tokens, encoder_inputs = self._plan_encoder_inputs(request, start, num_new_tokens, budget)
            if num_new_tokens <= 0:
                index += 1
                continue
            new_blocks = self._allocate_or_preempt(request, num_new_tokens, plan)
            if new_blocks is None:  # it preempted itself: everything after it is gone too
                break
            plan.cached_reqs.append(request)
            plan.new_block_ids[request.req_id] = [block.block_id for block in new_blocks] if new_blocks else []
            self._commit(request, num_new_tokens, encoder_inputs, budget, plan)
            # a preempted beam group may have left from before this request
            index = self.running.index(request) + 1 if plan.has_preempted else index + 1

    def _allocate_or_preempt(self, request: Request, num_new_tokens: int, plan: _StepPlan):
        """Allocate the step's slots, preempting the newest running requests until they fit.
        Returns the new blocks, or None when `request` itself had to go."""
        while True:
            new_blocks = self.kv_cache_manager.allocate_slots(request, num_new_tokens, request.num_inflight_tokens)
            if new_blocks is not None:
                return new_blocks
            victim = self.running.pop()
            if victim.beam_group is not None:   # beam search: the group goes (or fails) as a unit
                beam_groups.preempt_beam_group(self, victim, plan)
            elif victim is request and not self.running:
                # Nobody else holds blocks: the whole cache cannot hold this request.
                message = (f"The request grew to {request.num_tokens} tokens, more than the KV "
                           f"cache holds ({self.kv_cache_manager.max_num_tokens} tokens).")
                self._free_request(request, RequestStatus.FINISHED_ERROR, error=message)
                self.reject(request.req_id, message)
                return None
            else:
                self._preempt(victim)
            plan.has_preempted = True
            if request.status != RequestStatus.RUNNING:
                return None

    def _schedule_waiting(self, budget: _StepBudget, plan: _StepPlan) -> None:
        compiling: list[Request] = []   # [structured outputs] waiting for their grammar: skipped, kept in order
        while self.waiting and budget.num_tokens > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if not self._has_grammar(request, compiling):
                continue
            if request.beam_group is not None and not beam_groups.can_admit(self, request):
                break   # beam search: room for every beam of the group
            computed_blocks, num_hit_tokens = self.kv_cache_manager.get_computed_blocks(request)
            num_new_tokens = request.num_tokens - num_hit_tokens
            if not self.enable_chunked_prefill and num_new_tokens > budget.num_tokens:
                break
            num_new_tokens, encoder_inputs = self._plan_encoder_inputs(
                request, num_hit_tokens, min(num_new_tokens, budget.num_tokens), budget)
            if num_new_tokens <= 0:
                break
            new_blocks = self.kv_cache_manager.allocate_slots(
                request, num_new_tokens, num_hit_tokens, computed_blocks)
            if new_blocks is None:
                beam_groups.fail_if_group_cannot_fit(self, request)   # beam search: never a deadlock
                break
            self.waiting.popleft()
            self.kv_cache_manager.record_prefix_lookup(request.num_tokens, num_hit_tokens)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            self.running.append(request)
            plan.new_reqs.append(request)
            self._commit(request, num_new_tokens, encoder_inputs, budget, plan)
        self.waiting.extendleft(reversed(compiling))

    def _has_grammar(self, request: Request, compiling: list[Request]) -> bool:
        """[structured outputs] May the queue's head run? If not it is popped: to `compiling`, or failed."""
        if request.structured_output is None:
            return True
        status = self.structured_output.grammar_status(request.structured_output)
        if status == READY:
            return True
        self.waiting.popleft()
        if status == COMPILING:
            compiling.append(request)
        else:
            self._free_request(request, RequestStatus.FINISHED_ERROR, error=status)
            self.reject(request.req_id, status)
        return False

    def _plan_encoder_inputs(self, request: Request, num_computed_tokens: int, num_new_tokens: int,
                             budget: _StepBudget) -> tuple[int, list[int]]:
        """Items to encode for tokens [num_computed_tokens, +num_new_tokens) -> (the possibly
        shortened num_new_tokens, their indices). Cached items only gain this request's ref."""
        if request.media_end <= num_computed_tokens:
            return num_new_tokens, []   # no media, or all of it computed already
        end = num_computed_tokens + num_new_tokens
        input_ids: list[int] = []
        planned_mm_hashes: set[str] = set()
        num_embeds = 0
        for input_id, item in enumerate(request.mm_items):
            start_pos, length = item.placeholder.offset, item.placeholder.length
            if start_pos >= end:
                break
            if start_pos + length <= num_computed_tokens:
                continue  # its tokens are computed already
            if item.mm_hash in planned_mm_hashes or self.encoder_cache.check_and_update_cache(
                    request, input_id):
                continue
            if not self.encoder_cache.can_allocate(
                    request, input_id, budget.num_encoder_tokens - num_embeds, num_embeds):
                # Stop before this placeholder; if it started already, wait for a later step.
                return max(0, start_pos - num_computed_tokens), input_ids
            input_ids.append(input_id)
            planned_mm_hashes.add(item.mm_hash)
            num_embeds += length
        return num_new_tokens, input_ids

    def _ends_with_placeholder(self, request: Request) -> bool:
        """Async scheduling: the token still on the device reaches max_tokens or max_model_len."""
        if not request.num_output_placeholders:
            return False
        max_tokens = request.sampling_params.max_tokens
        num_outputs = len(request.output_token_ids) + request.num_output_placeholders
        return ((max_tokens is not None and num_outputs >= max_tokens)
                or len(request.all_token_ids) + request.num_output_placeholders >= self.max_model_len)

    def can_schedule_ahead(self) -> bool:
        """Async scheduling: False while a beam group runs (its beams are picked from the last
        step's log-probs). Penalties do not need the last token on the host: the runner counts it
        from the device (engine.runner.sampling_rows)."""
        return not beam_groups.needs_synchronous_steps(self)

    def has_structured_output_requests(self, scheduler_output: SchedulerOutput) -> bool:
        """[structured outputs] Does a request of the step have a grammar (its bitmask must follow
        the previous step's tokens)?"""
        requests = self.requests
        return self.structured_output is not None and any(
            requests[r].structured_output is not None for r in scheduler_output.num_scheduled_tokens if r in requests)

    def get_grammar_bitmask(self, scheduler_output: SchedulerOutput) -> GrammarBitmask | None:
        """[structured outputs] Bitmask rows of the step's constrained requests that sample, from the
        matchers as they stand: engine.core asks once the previous step's tokens are accepted,
        while this step's forward runs. A request finished since then gets no row (its token is
        dropped). The one start_grammar_bitmask started is joined instead (its rows were fixed
        then: a request finished since keeps its row, its token is dropped all the same)."""
        if self.structured_output is None:
            return None
        if self._grammar_bitmask_step is scheduler_output:
            self._grammar_bitmask_step = None
            return self.structured_output.take_bitmask()
        requests = [self.requests[r] for r in scheduler_output.num_scheduled_tokens if r in self.requests]
        return self.structured_output.grammar_bitmask(requests, scheduler_output.num_scheduled_tokens)

    def start_grammar_bitmask(self, scheduler_output: SchedulerOutput) -> None:
        """[structured outputs] Async scheduling: start building the bitmask of the step after the
        one being updated (its constrained requests that sample, in a thread; get_grammar_bitmask
        joins it). Called by engine.scheduler_update once the matchers accepted the update's tokens.
        A request of the step samples iff it has an output placeholder: its step reaches the end
        of its tokens (an earlier step in flight that samples would have left it nothing to do)."""
        requests = self.requests
        rows = [requests[r] for r in scheduler_output.num_scheduled_tokens
                if r in requests and requests[r].structured_output is not None
                and requests[r].num_output_placeholders]
        if rows:
            self.structured_output.start_bitmask(rows)
            self._grammar_bitmask_step = scheduler_output

    def _commit(self, request: Request, num_new_tokens: int, encoder_inputs: list[int],
                budget: _StepBudget, plan: _StepPlan) -> None:
        # In flight until update_from_output; a step that reaches the end of the request's
        # tokens samples one more (a placeholder until then).
        start = request.num_computed_tokens + request.num_inflight_tokens
        request.num_inflight_tokens += num_new_tokens
        if start + num_new_tokens == request.num_tokens + request.num_output_placeholders:
            request.num_output_placeholders += 1
        plan.num_scheduled_tokens[request.req_id] = num_new_tokens
        budget.num_tokens -= num_new_tokens
        if encoder_inputs:
            plan.encoder_inputs[request.req_id] = encoder_inputs
        for input_id in encoder_inputs:
            self.encoder_cache.allocate(request, input_id)
            budget.num_encoder_tokens -= request.mm_items[input_id].placeholder.length

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        self.encoder_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        if not request.has_sent_prompt_logprobs:
            request.prompt_logprobs = []  # recomputed from position 0
        self.waiting.appendleft(request)
        self.finished_req_ids.add(request.req_id)

    def _make_scheduler_output(self, plan: _StepPlan) -> SchedulerOutput:
        def first_position(request: Request) -> int:   # where this step's tokens start
            return (request.num_computed_tokens + request.num_inflight_tokens
                    - plan.num_scheduled_tokens[request.req_id])

        new_reqs = [NewRequestData(
            req_id=request.req_id, prompt_token_ids=request.prompt_token_ids,
            output_token_ids=list(request.output_token_ids), mm_items=request.mm_items,
            sampling_params=request.sampling_params,
            block_ids=self.kv_cache_manager.get_block_ids(request.req_id),
            num_computed_tokens=first_position(request)) for request in plan.new_reqs]
        cached_reqs = CachedRequestData(
            req_ids=[request.req_id for request in plan.cached_reqs],
            new_block_ids=[plan.new_block_ids[request.req_id] for request in plan.cached_reqs],
            num_computed_tokens=[first_position(request) for request in plan.cached_reqs])
        finished_req_ids, self.finished_req_ids = self.finished_req_ids, set()
        forked_reqs, kv_block_copies = beam_groups.take_beam_forks(self)
        return SchedulerOutput(
            scheduled_new_reqs=new_reqs, scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=plan.num_scheduled_tokens,
            total_num_scheduled_tokens=sum(plan.num_scheduled_tokens.values()),
            scheduled_encoder_inputs=plan.encoder_inputs, finished_req_ids=finished_req_ids,
            free_encoder_mm_hashes=self.encoder_cache.get_freed_mm_hashes(),
            forked_reqs=forked_reqs, kv_block_copies=kv_block_copies)

    # ---------------------------------------------------------------- update

    def update_from_output(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput,
                           next_step: SchedulerOutput | None = None) -> EngineOutputs:
        """The step's sampled tokens -> request state and outputs (engine.scheduler_update).
        next_step: the step scheduled after it (async scheduling) whose grammar bitmask the update
        starts building as soon as the matchers have accepted the tokens (start_grammar_bitmask)."""
        return scheduler_update.update_from_output(self, scheduler_output, runner_output, next_step)

    def _free_request(self, request: Request, status: RequestStatus, error: str | None = None) -> None:
        """Finish a request already out of the queues: release its blocks and encoder refs."""
        request.status = status
        request.error = error
        self.kv_cache_manager.free(request, discard_cached=status == RequestStatus.FINISHED_ERROR)
        self.encoder_cache.free(request)
        self.finished_req_ids.add(request.req_id)
        del self.requests[request.req_id]

    # ---------------------------------------------------------------- stats

    def make_stats(self) -> SchedulerStats:
        prefix_stats = self.kv_cache_manager.prefix_cache_stats
        return SchedulerStats(
            num_running_reqs=len(self.running), num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv_cache_manager.usage,
            num_prompt_tokens=self._step_prompt_tokens,
            num_generation_tokens=self._step_generation_tokens,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=prefix_stats.num_queries, prefix_cache_hits=prefix_stats.num_hits,
            num_free_blocks=self.kv_cache_manager.get_num_free_blocks(),
            num_total_blocks=self.kv_cache_manager.num_usable_blocks)

