"""Sampler vs hand-computed penalties and masks, seeded determinism, and a chi-square test that
sampling follows softmax(logits / T) restricted to the kept tokens."""

import math

import torch

from engine.sampler import (Sampler, SamplingBatch, apply_logit_bias, apply_min_p, apply_penalties,
                            apply_top_k_top_p, compute_logprobs, restrict_tokens, seed_key)

NEG_INF = float("-inf")


def batch_of(num_rows, temperature=1.0, seeds=None, position=0, **kwargs):
    seeds = seeds if seeds is not None else list(range(num_rows))
    return SamplingBatch(temperature=torch.full((num_rows,), float(temperature)),
                         seed_keys=torch.tensor([seed_key(s, position) for s in seeds]),
                         all_greedy=temperature == 0.0, **kwargs)


def test_greedy_is_argmax_even_with_other_rows_random():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
    batch = batch_of(2, temperature=1.0)
    batch.temperature = torch.tensor([0.0, 1.0])
    assert Sampler()(logits, batch).sampled_token_ids[0] == 1
    assert Sampler()(logits, batch_of(2, temperature=0.0)).sampled_token_ids.tolist() == [1, 0]


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    batch = batch_of(2, repetition_penalty=torch.tensor([2.0, 1.0]),
                     frequency_penalty=torch.tensor([0.5, 0.25]), presence_penalty=torch.tensor([0.1, 1.0]),
                     prompt_token_ids=torch.tensor([[1, -1], [0, 4]]),
                     output_token_ids=torch.tensor([[0, 0, 3], [2, 2, -1]]))
    # row 0: seen = {1 (prompt), 0, 3 (output)}; output counts {0: 2, 3: 1}
    row0 = [2.0 / 2 - 0.5 * 2 - 0.1, -1.0 * 2, 0.5, -3.0 * 2 - 0.5 * 1 - 0.1, 1.0]
    # row 1: repetition 1 (off); output counts {2: 2}; prompt tokens do not count for freq/presence
    row1 = [1.0, 1.0, 1.0 - 0.25 * 2 - 1.0, 1.0, 1.0]
    torch.testing.assert_close(apply_penalties(logits, batch), torch.tensor([row0, row1]))


def test_top_k_top_p_min_p_masks_match_hand_computation():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]]))
    kept = lambda x: (x != NEG_INF).tolist()
    assert kept(apply_top_k_top_p(logits, torch.tensor([3, 4]), None)) == [[False, True, True, True], [True] * 4]
    # top-p 0.6: most likely first 0.4 (< 0.6), + 0.3 = 0.7 reaches it -> keep {0.4, 0.3}
    assert kept(apply_top_k_top_p(logits, None, torch.tensor([0.6, 1.0]))) == [[False, True, False, True], [True] * 4]
    # top-p smaller than the top token's mass keeps just the top token
    assert kept(apply_top_k_top_p(logits, None, torch.tensor([0.05, 0.05])))[0] == [False, True, False, False]
    assert sum(kept(apply_top_k_top_p(logits, None, torch.tensor([0.05, 0.05])))[1]) == 1
    # min-p 0.6: threshold 0.6 * 0.4 = 0.24 -> keep {0.4, 0.3}; uniform row keeps all
    assert kept(apply_min_p(logits, torch.tensor([0.6, 0.6]))) == [[False, True, False, True], [True] * 4]


def test_logprobs_are_of_raw_logits_with_ranks():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    ids, values, ranks = compute_logprobs(logits, torch.tensor([2]), 2)
    log_z = math.log(sum(math.exp(v) for v in [1.0, 3.0, 2.0, 0.0]))
    assert ids.tolist() == [[2, 1, 2]] and ranks.tolist() == [[2, 1, 2]]
    torch.testing.assert_close(values, torch.tensor([[2.0 - log_z, 3.0 - log_z, 2.0 - log_z]]))
    out = Sampler()(logits, batch_of(1, temperature=0.0, repetition_penalty=torch.tensor([100.0]),
                                     prompt_token_ids=torch.tensor([[1]]), max_num_logprobs=1))
    assert out.sampled_token_ids.tolist() == [2]                # penalty moved the choice ...
    torch.testing.assert_close(out.logprobs, torch.tensor([[2.0 - log_z, 3.0 - log_z]]))  # ... not the logprobs


def test_banned_tokens_are_never_sampled():
    logits = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    out = Sampler()(logits, batch_of(2, temperature=0.0, banned_token_ids=torch.tensor([[0], [-1]])))
    assert out.sampled_token_ids.tolist() == [1, 0]


def test_seeded_sampling_is_stateless_and_batch_invariant():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    full = Sampler()(logits, batch_of(5, seeds=[11, 12, 13, 14, 15], position=3)).sampled_token_ids
    subset = Sampler()(logits[[3, 1]], batch_of(2, seeds=[14, 12], position=3)).sampled_token_ids
    assert subset.tolist() == [full[3].item(), full[1].item()]
    again = Sampler()(logits, batch_of(5, seeds=[11, 12, 13, 14, 15], position=3)).sampled_token_ids
    assert torch.equal(full, again)
    draws = {Sampler()(logits[:1], batch_of(1, seeds=[11], position=p)).sampled_token_ids.item() for p in range(40)}
    assert len(draws) > 5        # other output positions draw other noise


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled a token that was masked out"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_sampling_follows_the_intended_distribution():
    num_samples = 20000
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -4.0])
    rows = logits.expand(num_samples, -1)
    # temperature 0.7 alone
    out = Sampler()(rows, batch_of(num_samples, temperature=0.7)).sampled_token_ids
    probs = torch.softmax(logits / 0.7, dim=-1)
    # df = 5; the 0.999 quantile of chi-square(5) is 20.5
    assert _chi_square(torch.bincount(out, minlength=6).float(), probs) < 20.5
    # top-k 4 then top-p 0.8 at temperature 1: kept {4, 0, 1} (mass 0.52 + 0.19 + 0.12 of the top-4 set)
    batch = batch_of(num_samples, temperature=1.0, seeds=list(range(10**6, 10**6 + num_samples)),
                     top_k=torch.full((num_samples,), 4), top_p=torch.full((num_samples,), 0.8))
    out = Sampler()(rows, batch).sampled_token_ids
    top4 = torch.softmax(logits.masked_fill(logits < 0.0, NEG_INF), dim=-1)
    kept = torch.tensor([True, True, False, False, True, False])
    assert top4[kept].sum() >= 0.8 and top4[kept].sum() - top4[1] < 0.8
    probs = torch.softmax(logits.masked_fill(~kept, NEG_INF), dim=-1)
    # df = 2; the 0.999 quantile of chi-square(2) is 13.8
    assert _chi_square(torch.bincount(out, minlength=6).float(), probs) < 13.8


def test_vectorised_seed_keys_equal_the_scalar_mix():
    import random

    from engine.sampler import seed_keys
    rng = random.Random(0)
    seeds = [rng.randrange(-2 ** 70, 2 ** 70) for _ in range(200)] + [0, -1, 2 ** 64 - 1, 2 ** 63]
    positions = [rng.randrange(0, 10 ** 6) for _ in seeds]
    assert seed_keys(seeds, positions).tolist() == [list(seed_key(s, p)) for s, p in zip(seeds, positions)]


def test_grammar_mask_in_place_keeps_logprobs_of_the_unmasked_logits():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [1.0, 0.0, 2.0, 0.5], [0.5, 0.0, 0.0, 4.0]])
    original = logits.clone()
    # row 2 may take tokens {0, 2}, row 0 only token 2; row 1 has no grammar
    batch = batch_of(3, temperature=0.0, max_num_logprobs=2, grammar_rows=torch.tensor([2, 0]),
                     grammar_bitmask=torch.tensor([[0b0101], [0b0100]], dtype=torch.int32))
    out = Sampler()(logits, batch)
    assert out.sampled_token_ids.tolist() == [2, 2, 0]
    assert torch.equal(logits, original)   # the caller's float32 logits are not masked under logprobs
    torch.testing.assert_close(out.logprobs[:, 1:], torch.log_softmax(original, -1).topk(2, -1).values)
    sampled = Sampler()(logits, batch_of(3, temperature=1.0, grammar_rows=torch.tensor([2, 0]),
                                         grammar_bitmask=torch.tensor([[0b0101], [0b0100]], dtype=torch.int32)))
    assert sampled.sampled_token_ids[0] == 2 and sampled.sampled_token_ids[2] in (0, 2)


def test_repetition_penalty_changes_exactly_the_seen_columns():
    """Random logits of both signs, ids repeated across prompt and output, -1 padding anywhere, a
    row with penalty 1: equal, bit for bit, to the definition over the whole vocabulary."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen) * 3
    prompt = torch.tensor([[3, 7, 7, -1], [0, 49, 2, 2], [5, -1, -1, -1], [9, 9, 9, 9]])
    output = torch.tensor([[7, 12, -1], [-1, -1, -1], [5, 6, 40], [1, -1, 2]])
    penalty = torch.tensor([1.3, 2.0, 1.0, 0.7])
    got = apply_penalties(logits, batch_of(4, repetition_penalty=penalty, prompt_token_ids=prompt,
                                           output_token_ids=output))
    expected = logits.clone()
    for row in range(4):
        for token in {t for t in prompt[row].tolist() + output[row].tolist() if t >= 0}:
            value, p = logits[row, token], penalty[row]
            expected[row, token] = value / p if value > 0 else value * p
    assert torch.equal(got, expected)


def test_allowed_tokens_keep_a_restricted_row_to_its_tokens():
    logits = torch.tensor([[1.0, 5.0, 2.0, 0.0], [1.0, 5.0, 2.0, 0.0]])
    got = restrict_tokens(logits, torch.tensor([[2, 0], [-1, -1]]))
    inf = float("-inf")
    assert got.tolist() == [[1.0, inf, 2.0, inf], [1.0, 5.0, 2.0, 0.0]]


def test_logit_bias_adds_to_its_tokens_only():
    logits = torch.tensor([[1.0, 5.0, 2.0, 0.0], [1.0, 5.0, 2.0, 0.0]])
    got = apply_logit_bias(logits, torch.tensor([[3, 1], [2, -1]]), torch.tensor([[10.0, -5.0], [0.5, 7.0]]))
    assert got.tolist() == [[1.0, 0.0, 2.0, 10.0], [1.0, 5.0, 2.5, 0.0]]


def test_biased_and_restricted_rows_leave_the_greedy_fast_path():
    logits = torch.tensor([[1.0, 5.0, 2.0, 0.0]])
    batch = SamplingBatch(temperature=torch.zeros(1), seed_keys=torch.zeros(1, 2, dtype=torch.int64), all_greedy=True,
                          logit_bias_ids=torch.tensor([[3]]), logit_bias_values=torch.tensor([[9.0]]))
    assert Sampler()(logits, batch).sampled_token_ids.tolist() == [3]
    batch = SamplingBatch(temperature=torch.zeros(1), seed_keys=torch.zeros(1, 2, dtype=torch.int64), all_greedy=True,
                          allowed_token_ids=torch.tensor([[0, 2]]))
    assert Sampler()(logits, batch).sampled_token_ids.tolist() == [2]
