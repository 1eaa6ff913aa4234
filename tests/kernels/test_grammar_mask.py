"""kernels.apply_token_bitmask_inplace: the torch reference against a per-token bit loop (rows in
any order, a subset of rows, masks narrower and wider than the logits); the Triton kernel against
the reference in the interpreter (child process)."""

from __future__ import annotations

import pytest
import torch

import vlserve_kernels as kernels


def bit_loop_oracle(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> torch.Tensor:
    expected = logits.clone()
    num_words = bitmask.shape[1]
    for mask_row, row in enumerate(rows):
        for token in range(logits.shape[1]):
            word = token // 32
            allowed = word < num_words and (int(bitmask[mask_row, word]) >> (token % 32)) & 1
            if not allowed:
                expected[row, token] = float("-inf")
    return expected


@pytest.mark.parametrize("vocab, num_words, rows", [(70, 3, [2, 0]), (64, 2, [0, 1, 2]), (100, 2, [1]),
                                                    (33, 4, [2, 1, 0])])
def test_reference_matches_the_bit_loop(vocab, num_words, rows):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=generator)
    bitmask = torch.randint(-2 ** 31, 2 ** 31 - 1, (len(rows), num_words), dtype=torch.int32, generator=generator)
    bitmask[0, 0] = -1   # all allowed in a word: the sign bit is a token too
    expected = bit_loop_oracle(logits, rows, bitmask)
    kernels.apply_token_bitmask_inplace(logits, torch.tensor(rows), bitmask)
    assert torch.equal(logits, expected)


def test_reference_leaves_rows_without_a_mask_alone():
    logits = torch.randn(4, 40)
    untouched = logits[[1, 3]].clone()
    kernels.apply_token_bitmask_inplace(logits, torch.tensor([2, 0]), torch.zeros(2, 2, dtype=torch.int32))
    assert torch.equal(logits[[1, 3]], untouched) and bool((logits[[0, 2]] == float("-inf")).all())


def test_triton_kernel_in_interpreter(run_interpreted_cases):
    run_interpreted_cases("grammar_mask_cases.py")
