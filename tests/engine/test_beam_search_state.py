"""BeamSearchState's candidate ranking (engine/beam_search.py), vectorised, against scoring each
candidate one by one as transformers' topk over [beam * vocab + token] orders them: float32
cumulative sums, highest first, ties to the lower beam then the lower token id; stop tokens
dropped while min_tokens holds them back. Ties are frequent here on purpose (few distinct values)."""

import random

import numpy as np
import pytest

from engine.beam_search import Beam, BeamSearchState, num_candidates
from engine.protocol import TokenLogprobs
from engine.sampling_params import SamplingParams


def one_by_one(state: BeamSearchState, candidates: list[TokenLogprobs], banned: frozenset) -> list[tuple]:
    flat = []
    for parent, (beam, entry) in enumerate(zip(state.running, candidates)):
        for rank, (token_id, logprob) in enumerate(zip(entry.token_ids, entry.logprobs)):
            if token_id not in banned:
                flat.append((beam.cum_logprob + np.float32(logprob), parent, token_id, rank))
    flat.sort(key=lambda c: (-c[0], c[1], c[2]))
    return flat[:state.num_candidates]


def random_state(rng: random.Random, width: int, min_tokens: int, stop_token_ids: frozenset) -> BeamSearchState:
    params = SamplingParams(n=width, use_beam_search=True, temperature=0.0, max_tokens=50, min_tokens=min_tokens)
    state = BeamSearchState(params, stop_token_ids, frozenset(), max_new_tokens=50)
    values = [np.float32(-0.5), np.float32(-1.25), np.float32(-3.0)]
    state.running = [Beam([7, 8], [], rng.choice(values)) for _ in range(width)]   # two tokens generated
    return state


@pytest.mark.parametrize("seed", range(20))
def test_top_candidates_equal_scoring_one_by_one(seed):
    rng = random.Random(seed)
    width = rng.choice([2, 4, 8])
    stop_token_ids = frozenset({3, 5})
    state = random_state(rng, width, min_tokens=rng.choice([0, 10]), stop_token_ids=stop_token_ids)
    num_top = num_candidates(width, len(stop_token_ids)) + len(stop_token_ids)
    candidates = []
    for _ in range(width):
        token_ids = rng.sample(range(40), num_top)
        logprobs = sorted((float(rng.choice([-0.5, -0.75, -1.0, -2.0])) for _ in token_ids), reverse=True)
        candidates.append(TokenLogprobs(token_ids, logprobs, list(range(1, num_top + 1))))
    banned = stop_token_ids if state.num_generated < state.min_tokens else frozenset()
    got = [(c.score, c.parent, c.token_id, c.rank) for c in state._top_candidates(candidates)]
    assert got == one_by_one(state, candidates, banned)
    assert all(isinstance(c.score, np.float32) for c in state._top_candidates(candidates))
