"""Triton grammar mask (interpreter) against the torch reference. Run by tests/kernels/test_grammar_mask.py."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import vlserve_kernels as kernels

assert os.environ.get("TRITON_INTERPRET") == "1", "run via tests/kernels/test_grammar_mask.py"
grammar_mask = importlib.import_module("vlserve_kernels.grammar_mask")


@pytest.mark.parametrize("vocab, num_words, rows, dtype", [
    (70, 3, [2, 0], torch.float32),           # a subset, out of order; the mask covers the vocab
    (5000, 150, [0, 1, 2], torch.bfloat16),   # several column blocks; tokens past 32 * 150 forbidden
    (64, 4, [1], torch.float16),              # mask wider than the logits
])
def test_matches_reference(vocab, num_words, rows, dtype):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=generator).to(dtype)
    bitmask = torch.randint(-2 ** 31, 2 ** 31 - 1, (len(rows), num_words), dtype=torch.int32, generator=generator)
    bitmask[0, 0] = -1
    expected = logits.clone()
    grammar_mask._reference(expected, torch.tensor(rows), bitmask)
    assert kernels.uses_triton(logits)
    kernels.apply_token_bitmask_inplace(logits, torch.tensor(rows), bitmask)
    assert torch.equal(logits, expected)
    assert bool((logits == float("-inf")).any()) and bool((logits != float("-inf")).any())


def test_no_rows_is_a_no_op():
    logits = torch.randn(2, 40)
    before = logits.clone()
    kernels.apply_token_bitmask_inplace(logits, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 2, dtype=torch.int32))
    assert torch.equal(logits, before)
