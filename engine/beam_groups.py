"""The scheduler's side of beam search: a beam group's slots enter, step, fork, get preempted and
finish as one unit. Caller: engine.scheduler, at the call sites marked `# beam search`; the
search itself is engine.beam_search.BeamSearchState.

Life of a group (width k, user request id R):
  1. R arrives; it is the leader slot and runs as any request: one prefill (media encoded once).
  2. When every slot has computed its whole sequence, the runner's top log-probs of each slot are
     its candidates; BeamSearchState.step picks the next k beams. Slots "R#beam1".."R#beam{k-1}"
     are created on the first step, right after R in the running list (a group stays contiguous).
  3. KVCacheManager.reassign_beams re-points each slot's blocks at its parent's (shared full
     blocks, copy-on-write of the partial one); the next SchedulerOutput carries the forks and
     the block copies to the runner.
  4. Preemption takes every running slot of the group (recompute keeps each slot's tokens, so the
     search resumes where it was); abort and errors finish every slot.
  5. Done: one EngineOutput per hypothesis, "{rank}_R", best first; all blocks freed.
"""

from __future__ import annotations

from typing import Any

from engine.beam_search import BeamGroup, BeamSearchState, beam_slot_params
from engine.protocol import EngineOutput, FinishReason
from engine.request import Request, RequestStatus
from engine.scheduler_output import ForkedRequestData

# engine.scheduler.Scheduler, which calls these helpers (named, not imported: no import cycle).
Scheduler = Any


def start_beam_group(scheduler: Scheduler, leader: Request) -> None:
    params = leader.sampling_params
    stop_token_ids = frozenset(params.stop_token_ids or ()) | (
        frozenset() if params.ignore_eos else scheduler.eos_token_ids)
    max_new_tokens = scheduler.max_model_len - leader.num_prompt_tokens
    if params.max_tokens is not None:
        max_new_tokens = min(max_new_tokens, params.max_tokens)
    eos_token_ids = frozenset() if params.ignore_eos else scheduler.eos_token_ids   # stop_reason None
    search = BeamSearchState(params, stop_token_ids, eos_token_ids, max_new_tokens)
    group = BeamGroup(leader.req_id, search, params.logprobs, slots=[leader])
    leader.sampling_params = beam_slot_params(params, len(stop_token_ids))
    leader.beam_group = group
    scheduler.beam_groups[leader.req_id] = group


def needs_synchronous_steps(scheduler: Scheduler) -> bool:
    """While a group runs, step N+1 cannot be scheduled before step N's log-probs are on the host
    (they pick the beams): an asynchronous engine loop must step synchronously."""
    return bool(scheduler.beam_groups)


def can_admit(scheduler: Scheduler, leader: Request) -> bool:
    """A leader that has not forked yet enters only with room for all its beams: width sequences
    under max_num_seqs, and free blocks for its prompt plus one block per beam (unless nothing
    runs, so that a group is never kept out of an idle engine)."""
    group = leader.beam_group
    if len(group.slots) > 1 or group.search.num_generated > 0 or not scheduler.running:
        return True
    width, manager = group.search.width, scheduler.kv_cache_manager
    num_blocks = -(-leader.num_tokens // manager.block_size) + width
    return (len(scheduler.running) + width <= scheduler.max_num_seqs
            and manager.get_num_free_blocks() >= num_blocks)


def advance_beam_groups(scheduler: Scheduler) -> list[EngineOutput]:
    """After a step: every group whose slots all reported takes its next step."""
    outputs = []
    for group in list(scheduler.beam_groups.values()):
        if group.is_step_complete:
            outputs += _advance(scheduler, group)
    return outputs


def _advance(scheduler: Scheduler, group: BeamGroup) -> list[EngineOutput]:
    num_computed = group.slots[0].num_tokens   # every slot: prompt + the same number of outputs
    parents = group.search.step([group.candidates[slot.req_id] for slot in group.slots])
    scheduler._step_generation_tokens += len(group.slots)   # one token per beam (for /metrics)
    group.candidates.clear()
    if group.search.is_done:
        outputs = group.final_outputs(max(0, group.slots[0].num_cached_tokens))
        finish_beam_group(scheduler, group, RequestStatus.FINISHED_STOPPED)
        return outputs
    parent_ids = [group.slots[p].req_id for p in parents]
    parent_hashes = {slot.req_id: slot.block_hashes for slot in group.slots}
    _add_slots(scheduler, group, len(parents))
    kv = scheduler.kv_cache_manager
    group.pending_copies += kv.reassign_beams([slot.req_id for slot in group.slots], parent_ids, num_computed)
    for slot, parent_id, beam in zip(group.slots, parent_ids, group.search.running):
        slot.output_token_ids = list(beam.output_token_ids)
        slot.all_token_ids = slot.prompt_token_ids + slot.output_token_ids
        slot.num_computed_tokens = num_computed
        slot.block_hashes = parent_hashes[parent_id][:num_computed // kv.block_size]
        group.pending_forks.append(ForkedRequestData(
            slot.req_id, parent_id, list(beam.output_token_ids), kv.get_block_ids(slot.req_id), num_computed))
    return []


def _add_slots(scheduler: Scheduler, group: BeamGroup, width: int) -> None:
    """First step: the leader's siblings, inserted after it (the group stays contiguous)."""
    leader = group.slots[0]
    position = scheduler.running.index(leader) + 1
    while len(group.slots) < width:
        slot = Request(group.slot_req_id(len(group.slots)), leader.prompt_token_ids, leader.sampling_params,
                       leader.mm_items, leader.arrival_time, leader.cache_salt)
        slot.status, slot.beam_group, slot.num_cached_tokens = RequestStatus.RUNNING, group, leader.num_cached_tokens
        scheduler.requests[slot.req_id] = slot
        scheduler.running.insert(position + len(group.slots) - 1, slot)
        group.slots.append(slot)


def take_beam_forks(scheduler: Scheduler) -> tuple[list[ForkedRequestData], list[tuple[int, int]]]:
    """The forks and KV copies decided since the last schedule(), for the SchedulerOutput."""
    forks, copies = [], []
    for group in scheduler.beam_groups.values():
        forks += group.pending_forks
        copies += group.pending_copies
        group.pending_forks, group.pending_copies = [], []
    return forks, copies


def preempt_beam_group(scheduler: Scheduler, victim: Request, plan) -> None:
    """The scheduler popped `victim`, a slot, to free blocks: the whole group goes. When nobody
    else holds blocks the group alone cannot fit the cache, and it ends with an error."""
    group = victim.beam_group
    is_alone = all(other.beam_group is group for other in scheduler.running)
    scheduler.running.append(victim)
    _preempt_slots(scheduler, group, plan)
    if is_alone:
        scheduler.pending_outputs.append(fail_beam_group(scheduler, group, _too_big(scheduler, group)))


def fail_if_group_cannot_fit(scheduler: Scheduler, waiting_slot: Request) -> None:
    """A slot found no blocks while its siblings run: if they are all that holds blocks, they wait
    for it forever (they only step together), so the group needs more than the whole cache."""
    group = waiting_slot.beam_group
    if group is None or not scheduler.running or any(
            r.beam_group is not group or r.num_computed_tokens < r.num_tokens for r in scheduler.running):
        return   # somebody else holds blocks, or a sibling is still computing (maybe in this step)
    scheduler.pending_outputs.append(fail_beam_group(scheduler, group, _too_big(scheduler, group)))


def _too_big(scheduler: Scheduler, group: BeamGroup) -> str:
    return (f"beam search with width {group.search.width} needs more KV cache than there is "
            f"({scheduler.kv_cache_manager.max_num_tokens} tokens); lower the width or max_tokens")


def _preempt_slots(scheduler: Scheduler, group: BeamGroup, plan) -> None:
    """Every running slot goes back to the front of the waiting queue, in slot order. Slots already
    scheduled in this step are taken out of the plan (their budget is not given back: the step is
    just smaller)."""
    group.forget_step()
    for slot in reversed(group.slots):
        if slot.status != RequestStatus.RUNNING:
            continue
        if slot in scheduler.running:
            scheduler.running.remove(slot)
        if slot.req_id in plan.num_scheduled_tokens:
            plan.cached_reqs.remove(slot)
            del plan.num_scheduled_tokens[slot.req_id]
            plan.new_block_ids.pop(slot.req_id, None)
            plan.encoder_inputs.pop(slot.req_id, None)
        scheduler._preempt(slot)


def finish_beam_group(scheduler: Scheduler, group: BeamGroup, status: RequestStatus,
                      error: str | None = None) -> None:
    """Free every slot (done, aborted or failed)."""
    for slot in group.slots:
        if slot.is_finished:
            continue
        if slot.status == RequestStatus.RUNNING:
            scheduler.running.remove(slot)
        elif slot in scheduler.waiting:
            scheduler.waiting.remove(slot)
        scheduler._free_request(slot, status, error)
    scheduler.beam_groups.pop(group.req_id, None)


def fail_beam_group(scheduler: Scheduler, group: BeamGroup, error: str) -> EngineOutput:
    finish_beam_group(scheduler, group, RequestStatus.FINISHED_ERROR, error)
    return EngineOutput(req_id=group.req_id, new_token_ids=[], finish_reason=FinishReason.ERROR, error=error)

