"""Beam search inside the engine, step for step what transformers' `generate(num_beams=k,
do_sample=False)` does (transformers 5.23 `GenerationMixin._beam_search`). Caller: engine.scheduler,
at the call sites marked `# beam search`.

A beam group is one user request. Its prompt (and media) is prefilled and encoded once by the
leader slot; afterwards the group holds k slots, scheduler Requests that decode one token each per
step. Every step, once all k slots have reported their top candidates, `BeamSearchState.step`
picks the next k beams; the scheduler then re-points each slot at its new beam:

    step t:   slot0 = "a b"   slot1 = "a c"          (B = 4, prompt P = "p p p", N = 5 computed)
    blocks:   [p p p a][b . ] [p p p a][c . ]        full block shared (ref 2), last block own
    pick:     slot0 <- slot1 + "d",  slot1 <- slot1 + "e"   (slot0's beam is pruned)
    step t+1: slot0 = "a c d" slot1 = "a c e"
    blocks:   [p p p a][c d ] [p p p a][c e ]        slot1's last block copied for slot0 (copy on
                                                     write), slot0's old last block freed at once

Scores (float32, as transformers): a beam's cumulative log-prob is the sum of log_softmax(raw
logits) of its tokens; a finished hypothesis scores cum_logprob / generated_len ** length_penalty,
where generated_len counts the EOS token and not the prompt. (vLLM's `beam_search` divides by the
whole sequence length, prompt included, and drops the EOS: scores and so rankings may differ.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import numpy as np

from engine.protocol import EngineOutput, FinishReason, TokenLogprobs
from engine.sampling_params import SamplingParams

_FINISHED_FLOOR = np.float32(-1.0e9)   # transformers' score of an empty finished slot


@dataclass
class Beam:
    output_token_ids: list[int]
    logprobs: list[TokenLogprobs]        # one per output token: chosen first, then the top ones
    cum_logprob: np.float32


@dataclass
class Hypothesis:
    beam: Beam
    score: np.float32                    # cum_logprob / generated_len ** length_penalty
    finish_reason: FinishReason
    stop_reason: int | None


@dataclass
class _Candidate:
    score: np.float32                    # parent's cum_logprob + logprob of token
    parent: int                          # index into the running beams
    token_id: int
    rank: int                            # position of token_id in the parent's candidate list


def num_candidates(width: int, num_stop_tokens: int) -> int:
    """Continuations kept per step (transformers' beams_to_keep): enough that `width` of them do
    not stop, however many stop tokens the top ones hit."""
    return max(2, 1 + num_stop_tokens) * width


class BeamSearchState:
    """The search itself: running beams, finished hypotheses, the stopping rules. No KV, no
    tensors: `step` takes each running beam's top candidates and returns the parents of the next
    beams. A pure function of the candidates, so preemption (recompute) never changes it."""

    def __init__(self, params: SamplingParams, stop_token_ids: frozenset[int], eos_token_ids: frozenset[int],
                 max_new_tokens: int) -> None:
        self.width = params.n
        self.length_penalty = params.length_penalty
        self.early_stopping = params.early_stopping
        self.min_tokens = params.min_tokens
        self.max_new_tokens = max_new_tokens
        self.stop_token_ids = stop_token_ids      # EOS (unless ignore_eos) + stop_token_ids
        self.eos_token_ids = eos_token_ids        # of those, the ones that give stop_reason None
        self.num_candidates = num_candidates(self.width, len(stop_token_ids))
        self.running = [Beam([], [], np.float32(0.0))]   # before the first step: the prompt alone
        self.finished: list[Hypothesis] = []             # best first, at most `width`
        self.is_improvable = True                        # transformers' is_early_stop_heuristic_unsatisfied
        self.is_done = False

    @property
    def num_generated(self) -> int:
        return len(self.running[0].output_token_ids)

    def step(self, candidates: list[TokenLogprobs]) -> list[int]:
        """candidates[i]: running beam i's top tokens by log-prob (at least num_candidates of them,
        plus the stop tokens while min_tokens holds them back). Extends the search by one token;
        returns for each new running beam the index of its parent (empty once is_done)."""
        generated_len = self.num_generated + 1
        top = self._top_candidates(candidates)
        hits_stop = [self._stops(c.token_id, generated_len) for c in top]
        self._add_finished(top, hits_stop, generated_len, candidates)
        continuing = [c for c, stops in zip(top, hits_stop) if not stops][:self.width]
        previous = self.running
        self.running = [self._extend(previous[c.parent], c, candidates) for c in continuing]
        self.is_improvable = self.is_improvable and self._can_improve(generated_len)
        all_full = len(self.finished) == self.width and self.early_stopping is True
        self.is_done = not self.is_improvable or all_full or all(hits_stop) or not self.running
        return [] if self.is_done else [c.parent for c in continuing]

    def _top_candidates(self, candidates: list[TokenLogprobs]) -> list[_Candidate]:
        """The num_candidates best continuations, vectorised over every beam's candidates (the
        same float32 sums and order as scoring them one by one). Flat index i = parent * m + rank."""
        token_ids = np.array([entry.token_ids for entry in candidates], dtype=np.int64)    # [beams, m]
        logprobs = np.array([entry.logprobs for entry in candidates], dtype=np.float32)   # [beams, m]
        cum_logprobs = np.array([beam.cum_logprob for beam in self.running], dtype=np.float32)   # [beams]
        num_beams, m = token_ids.shape
        scores = (cum_logprobs[:, None] + logprobs).ravel()                               # [beams * m]
        flat_ids = token_ids.ravel()
        parents = np.repeat(np.arange(num_beams), m)
        # torch.topk over [beam * vocab + token]: highest score first; ties to the lower index
        order = np.lexsort((flat_ids, parents, -scores))
        if self.num_generated < self.min_tokens and self.stop_token_ids:
            # min_tokens: transformers sets the stop tokens' log-prob to -inf; here they are dropped
            order = order[~np.isin(flat_ids[order], list(self.stop_token_ids))]
        return [_Candidate(scores[i], int(i) // m, int(flat_ids[i]), int(i) % m) for i in order[:self.num_candidates]]

    def _stops(self, token_id: int, generated_len: int) -> bool:
        return token_id in self.stop_token_ids or generated_len >= self.max_new_tokens

    def _add_finished(self, top: list[_Candidate], hits_stop: list[bool], generated_len: int,
                      candidates: list[TokenLogprobs]) -> None:
        """Only the first `width` of the top candidates may finish (the rest are spares)."""
        if not self.is_improvable or (len(self.finished) == self.width and self.early_stopping is True):
            return
        penalty = np.float32(generated_len ** self.length_penalty)
        for candidate, stops in zip(top[:self.width], hits_stop[:self.width]):
            if not stops:
                continue
            beam = self._extend(self.running[candidate.parent], candidate, candidates)
            token_id = candidate.token_id
            is_stop_token = token_id in self.stop_token_ids
            self.finished.append(Hypothesis(
                beam, np.float32(candidate.score / penalty),
                FinishReason.STOP if is_stop_token else FinishReason.LENGTH,
                token_id if is_stop_token and token_id not in self.eos_token_ids else None))
        self.finished.sort(key=lambda h: -h.score)   # stable: earlier hypotheses win ties
        del self.finished[self.width:]

    def _can_improve(self, generated_len: int) -> bool:
        """transformers' _check_early_stop_heuristic, after the step."""
        if len(self.finished) < self.width or not self.running:
            return bool(self.running)
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_new_tokens
        else:
            best_length = generated_len
        best_possible = np.float32(self.running[0].cum_logprob / np.float32(best_length ** self.length_penalty))
        return bool(best_possible > min(h.score for h in self.finished))

    @staticmethod
    def _extend(parent: Beam, candidate: _Candidate, candidates: list[TokenLogprobs]) -> Beam:
        entry = candidates[candidate.parent]
        rank = candidate.rank
        chosen = TokenLogprobs([entry.token_ids[rank]] + entry.token_ids, [entry.logprobs[rank]] + entry.logprobs,
                               [entry.ranks[rank]] + entry.ranks)
        return Beam(parent.output_token_ids + [candidate.token_id], parent.logprobs + [chosen], candidate.score)

    def results(self) -> list[Hypothesis]:
        return list(self.finished)


@dataclass
class BeamGroup:
    """The scheduler's view of one beam-search request: its slots (Requests, slot 0 is the
    leader that prefilled the prompt), what each reported this step, and the KV forks decided at
    the end of the last step that the next SchedulerOutput carries to the runner."""

    req_id: str                                   # the user's request id
    search: BeamSearchState
    num_logprobs: int | None                      # the user's `logprobs` (None: not asked)
    slots: list = field(default_factory=list)     # list[Request]
    candidates: dict[str, TokenLogprobs] = field(default_factory=dict)
    pending_forks: list = field(default_factory=list)     # list[ForkedRequestData]
    pending_copies: list[tuple[int, int]] = field(default_factory=list)

    def slot_req_id(self, index: int) -> str:
        return self.req_id if index == 0 else f"{self.req_id}#beam{index}"

    def record(self, req_id: str, entry: TokenLogprobs) -> None:
        """A slot computed its whole sequence: its top tokens (the runner's sampled token first,
        dropped here) are its candidates for this step."""
        self.candidates[req_id] = TokenLogprobs(entry.token_ids[1:], entry.logprobs[1:], entry.ranks[1:])

    @property
    def is_step_complete(self) -> bool:
        return len(self.candidates) == len(self.slots)

    def forget_step(self) -> None:
        """Preempted: what was reported or forked is recomputed from the slots' tokens."""
        self.candidates.clear()
        self.pending_forks.clear()
        self.pending_copies.clear()

    def final_outputs(self, num_cached_tokens: int) -> list[EngineOutput]:
        """One EngineOutput per hypothesis, best first, as "{rank}_{req_id}" (the n>1 naming)."""
        outputs = []
        for rank, hypothesis in enumerate(self.search.results()):
            beam = hypothesis.beam
            logprobs = None
            if self.num_logprobs is not None:
                k = self.num_logprobs + 1
                logprobs = [TokenLogprobs(e.token_ids[:k], e.logprobs[:k], e.ranks[:k]) for e in beam.logprobs]
            outputs.append(EngineOutput(
                req_id=f"{rank}_{self.req_id}", new_token_ids=list(beam.output_token_ids), new_logprobs=logprobs,
                finish_reason=hypothesis.finish_reason, stop_reason=hypothesis.stop_reason,
                num_cached_tokens=num_cached_tokens, cumulative_logprob=float(beam.cum_logprob)))
        return outputs


def beam_slot_params(params: SamplingParams, num_stop_tokens: int) -> SamplingParams:
    """The params a slot runs with: greedy, and the runner returns enough top log-probs for the
    step (num_candidates, plus the stop tokens min_tokens may filter out, plus what the user wants)."""
    needed = num_candidates(params.n, num_stop_tokens) + num_stop_tokens
    return msgspec.structs.replace(params, temperature=0.0, logprobs=max(needed, params.logprobs or 0))


# ---------------------------------------------------------------- the offline API (vLLM's names)

@dataclass(frozen=True)
class BeamSearchParams:
    """LLM.beam_search's parameters, as vLLM's, plus transformers' early_stopping."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0             # only 0: beam sampling is not supported
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: bool | str = False   # True, False or "never"

    def to_sampling_params(self) -> SamplingParams:
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}")
        return SamplingParams(n=self.beam_width, use_beam_search=True, temperature=self.temperature,
                              max_tokens=self.max_tokens, ignore_eos=self.ignore_eos, logprobs=0,
                              length_penalty=self.length_penalty, early_stopping=self.early_stopping,
                              include_stop_str_in_output=self.include_stop_str_in_output).validate()


@dataclass
class BeamSearchSequence:
    """One returned beam. As in vLLM, `tokens` include the prompt and `text` decodes them all."""

    tokens: list[int]
    logprobs: list                       # one {token_id: Logprob} per generated token
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first (transformers' score)
