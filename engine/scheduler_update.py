"""The scheduler's second half: a finished step's sampled tokens -> request state and one
EngineOutput per request that produced something. Caller: engine.scheduler.Scheduler.
update_from_output (engine.core calls it after runner.execute, or when an async step's tokens
reach the host). Mutates the requests and the scheduler's queues; never touches a tensor.

A request's step ends one of four ways: a partial prefill (no token, maybe prompt logprobs), a
sampled token (appended, then the stop checks), a beam-search step (its log-probs go to the group),
or a failure in the runner (FinishReason.ERROR). Requests preempted while an async step ran keep
the token it sampled (see _update_preempted).

Every running request passes through here every step: the per-request path reads attributes,
not properties, and skips prompt logprobs and media at one test each.
"""

from __future__ import annotations

import time
from typing import Any

import engine.beam_groups as beam_groups
from engine.protocol import EngineOutput, EngineOutputs, FinishReason, TokenLogprobs
from engine.request import Request, RequestStatus
from engine.runner_output import ModelRunnerOutput
from engine.scheduler_output import SchedulerOutput
from engine.structured_output.manager import REFUSED_TOKEN_MESSAGE

# engine.scheduler.Scheduler, which calls these helpers (named, not imported: no import cycle).
Scheduler = Any

_RUNNING, _PREEMPTED = RequestStatus.RUNNING, RequestStatus.PREEMPTED


def update_from_output(scheduler: Scheduler, scheduler_output: SchedulerOutput,
                       runner_output: ModelRunnerOutput, next_step: SchedulerOutput | None = None) -> EngineOutputs:
    outputs, scheduler.pending_outputs = scheduler.pending_outputs, []
    scheduler._step_prompt_tokens = scheduler._step_generation_tokens = 0
    requests = scheduler.requests
    grammar_steps: list[tuple[Request, int, list[int]]] = []   # [structured outputs] updated after the loop
    for req_id, num_tokens, sampled_token_ids in _scheduled_with_samples(scheduler_output, runner_output):
        request = requests.get(req_id)
        if request is None:
            continue  # aborted or finished since the step was scheduled
        request.num_inflight_tokens -= num_tokens
        if sampled_token_ids and request.num_output_placeholders:
            request.num_output_placeholders -= 1
        status = request.status
        if status == _RUNNING:
            if request.structured_output is not None and len(sampled_token_ids) == 1:
                grammar_steps.append((request, num_tokens, sampled_token_ids))
                continue
            output = _update_request(scheduler, request, num_tokens, sampled_token_ids, runner_output)
        elif status == _PREEMPTED:
            output = _update_preempted(scheduler, request, sampled_token_ids, runner_output)
        else:
            continue
        if output is not None:
            outputs.append(output)
    if grammar_steps:
        _update_grammar_requests(scheduler, grammar_steps, runner_output, outputs, next_step)
    elif next_step is not None:   # [structured outputs] no matcher moved in this update
        scheduler.start_grammar_bitmask(next_step)
    if scheduler.beam_groups:   # beam search: groups whose slots all reported pick their next beams
        outputs += beam_groups.advance_beam_groups(scheduler)
    return EngineOutputs(outputs=outputs, stats=scheduler.make_stats(), timestamp=time.time())


def _scheduled_with_samples(scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput):
    """(req_id, scheduled tokens, sampled token ids) of each scheduled request. The runner keeps
    the scheduler's order (a zip then suffices); otherwise look each up ([] if it has none)."""
    scheduled = scheduler_output.num_scheduled_tokens
    if runner_output.req_ids == list(scheduled):
        return zip(runner_output.req_ids, scheduled.values(), runner_output.sampled_token_ids)
    sampled_by_req = dict(zip(runner_output.req_ids, runner_output.sampled_token_ids))
    return ((req_id, num_tokens, sampled_by_req.get(req_id, [])) for req_id, num_tokens in scheduled.items())


def _update_grammar_requests(scheduler: Scheduler, steps: list[tuple[Request, int, list[int]]],
                             runner_output: ModelRunnerOutput, outputs: list[EngineOutput],
                             next_step: SchedulerOutput | None) -> None:
    """[structured outputs] The running grammar requests that sampled one token: the tokens that
    _append_sampled would append (not failed, not a partial prefill, not beam search) go to the
    matchers in one batched call, then each request is updated as the others are. The last
    matcher has moved there (the loop above moved those of preempted requests and of multi-token
    steps): next_step's bitmask build starts in the manager's thread and overlaps the rest."""
    failed = runner_output.failed
    appending = [(request, sampled[0]) for request, num_tokens, sampled in steps
                 if request.num_computed_tokens + num_tokens == len(request.all_token_ids)
                 and request.beam_group is None and not (failed and request.req_id in failed)]
    accepted = dict(zip((request.req_id for request, _ in appending), scheduler.structured_output.accept_batch(
        [request.structured_output for request, _ in appending], [token_id for _, token_id in appending])))
    if next_step is not None:
        scheduler.start_grammar_bitmask(next_step)
    for request, num_tokens, sampled_token_ids in steps:
        output = _update_request(scheduler, request, num_tokens, sampled_token_ids, runner_output,
                                 accepted.get(request.req_id))
        if output is not None:
            outputs.append(output)


def _update_request(scheduler: Scheduler, request: Request, num_tokens: int, sampled_token_ids: list[int],
                    runner_output: ModelRunnerOutput, accepted: bool | None = None) -> EngineOutput | None:
    req_id = request.req_id
    if runner_output.failed and req_id in runner_output.failed:
        return _fail_request(scheduler, request, runner_output.failed[req_id])
    start = request.num_computed_tokens
    num_prompt_tokens = len(request.prompt_token_ids)
    if start < num_prompt_tokens:
        scheduler._step_prompt_tokens += min(start + num_tokens, num_prompt_tokens) - start
    request.num_computed_tokens = start + num_tokens
    prompt_logprobs = None
    if request.sampling_params.prompt_logprobs is not None:
        prompt_logprobs = _collect_prompt_logprobs(request, runner_output.prompt_logprobs.get(req_id))
    new_token_ids: list[int] = []
    if request.num_computed_tokens != len(request.all_token_ids):
        pass   # a partial prefill
    elif request.beam_group is not None:   # beam search
        request.beam_group.record(req_id, runner_output.logprobs[req_id][0])
    else:
        new_token_ids = _append_sampled(scheduler, request, sampled_token_ids, accepted)
    scheduler._step_generation_tokens += len(new_token_ids)
    if request.media_end > start:   # else its media were freed in an earlier step
        _free_computed_encoder_inputs(scheduler, request)
    is_finished = request.status.is_finished
    if not new_token_ids and prompt_logprobs is None and not is_finished:
        return None
    logprobs = runner_output.logprobs.get(req_id) if runner_output.logprobs else None
    output = EngineOutput(
        req_id=req_id, new_token_ids=new_token_ids,
        new_logprobs=logprobs[:len(new_token_ids)] if logprobs and new_token_ids else None,
        prompt_logprobs=prompt_logprobs, finish_reason=request.status.finish_reason,
        stop_reason=request.stop_reason, num_cached_tokens=max(0, request.num_cached_tokens),
        error=request.error)
    if is_finished:
        scheduler.running.remove(request)
        scheduler._free_request(request, request.status)
    return output


def _append_sampled(scheduler: Scheduler, request: Request, sampled_token_ids: list[int],
                    accepted: bool | None = None) -> list[int]:
    """Append the step's tokens until a stop condition (or a refused grammar token) finishes it.
    accepted: the grammar's verdict on the one sampled token, already given (_update_grammar_requests)."""
    new_token_ids = []
    for token_id in sampled_token_ids:
        request.append_output_token_id(token_id)
        new_token_ids.append(token_id)
        if accepted is None and request.structured_output is not None:
            ok = scheduler.structured_output.accept_tokens(request.structured_output, [token_id])
        else:   # no grammar (True), or the one token's verdict given
            ok = accepted is not False
        if not ok:   # [structured outputs] never fail open
            request.status, request.error = RequestStatus.FINISHED_ERROR, REFUSED_TOKEN_MESSAGE
            break
        if check_stop(request, scheduler.eos_token_ids, scheduler.max_model_len):
            break
    return new_token_ids


def _fail_request(scheduler: Scheduler, request: Request, message: str) -> EngineOutput | None:
    if request.beam_group is not None:   # beam search: the whole group fails
        return beam_groups.fail_beam_group(scheduler, request.beam_group, message)
    scheduler.running.remove(request)
    scheduler._free_request(request, RequestStatus.FINISHED_ERROR, error=message)
    return EngineOutput(req_id=request.req_id, new_token_ids=[], finish_reason=FinishReason.ERROR,
                        error=message)


def _update_preempted(scheduler: Scheduler, request: Request, sampled_token_ids: list[int],
                      runner_output: ModelRunnerOutput) -> EngineOutput | None:
    """Async scheduling: preempted while its step ran. The step's KV is gone, but a token it
    sampled was computed from the full context: keep it (the recompute includes it)."""
    if not sampled_token_ids or request.req_id in runner_output.failed:
        return None
    request.append_output_token_id(sampled_token_ids[0])
    scheduler._step_generation_tokens += 1
    if request.structured_output is not None and not scheduler.structured_output.accept_tokens(
            request.structured_output, sampled_token_ids[:1]):   # [structured outputs] never fail open
        request.status, request.error = RequestStatus.FINISHED_ERROR, REFUSED_TOKEN_MESSAGE
    if request.is_finished or check_stop(request, scheduler.eos_token_ids, scheduler.max_model_len):
        scheduler.waiting.remove(request)
        scheduler._free_request(request, request.status, request.error)
    logprobs = runner_output.logprobs.get(request.req_id)
    return EngineOutput(
        req_id=request.req_id, new_token_ids=sampled_token_ids[:1], new_logprobs=logprobs[:1] if logprobs else None,
        finish_reason=request.status.finish_reason, stop_reason=request.stop_reason,
        num_cached_tokens=max(0, request.num_cached_tokens), error=request.error)


def _collect_prompt_logprobs(request: Request, chunk: list[TokenLogprobs | None] | None
                             ) -> list[TokenLogprobs | None] | None:
    """Concatenate per-chunk prompt logprobs; return them once, when the prompt is done.
    The runner may give position 0 as None or leave it out (vLLM's convention)."""
    if request.has_sent_prompt_logprobs:
        return None
    request.prompt_logprobs.extend(chunk or [])
    if request.num_computed_tokens < request.num_prompt_tokens:
        return None
    prompt_logprobs = request.prompt_logprobs
    if len(prompt_logprobs) == request.num_prompt_tokens - 1:
        prompt_logprobs = [None] + prompt_logprobs
    request.prompt_logprobs, request.has_sent_prompt_logprobs = [], True
    return prompt_logprobs


def _free_computed_encoder_inputs(scheduler: Scheduler, request: Request) -> None:
    for input_id, item in enumerate(request.mm_items):
        if item.placeholder.offset + item.placeholder.length > request.num_computed_tokens:
            break
        scheduler.encoder_cache.free_encoder_input(request, input_id)


def check_stop(request: Request, eos_token_ids: frozenset[int], max_model_len: int) -> bool:
    """After appending a sampled token: finish the request if a stop condition holds (sets its
    status and stop_reason). max_model_len is a hard cap; min_tokens suppresses the others."""
    params = request.sampling_params
    num_output_tokens = len(request.output_token_ids)
    token_id = request.output_token_ids[-1]
    if len(request.all_token_ids) >= max_model_len:
        request.status = RequestStatus.FINISHED_LENGTH_CAPPED
    elif num_output_tokens < params.min_tokens:
        return False
    elif not params.ignore_eos and token_id in eos_token_ids:
        request.status = RequestStatus.FINISHED_STOPPED
    elif params.stop_token_ids and token_id in params.stop_token_ids:
        request.status = RequestStatus.FINISHED_STOPPED
        request.stop_reason = token_id
    elif params.max_tokens is not None and num_output_tokens >= params.max_tokens:
        request.status = RequestStatus.FINISHED_LENGTH_CAPPED
    else:
        return False
    return True
