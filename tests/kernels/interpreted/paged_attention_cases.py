"""Triton paged attention (interpreter, CPU tensors) against the torch reference.
Run by tests/kernels/test_paged_attention.py in a child process with TRITON_INTERPRET=1."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import kernels
from paged_batch import ATTENTION_ARGS, MIXED, make_batch

assert os.environ.get("TRITON_INTERPRET") == "1", "run via tests/kernels/test_paged_attention.py"
paged_attention_module = importlib.import_module("kernels.paged_attention")


def _reference(batch):
    return paged_attention_module._reference(
        *(batch[k] for k in ATTENTION_ARGS[:7]), out=torch.empty_like(batch["query"]),
        query_lens_cpu=None, seq_lens_cpu=None)


def _triton(batch, **kwargs):
    out = torch.full_like(batch["query"], float("nan"))
    return paged_attention_module._triton(*(batch[k] for k in ATTENTION_ARGS), out=out,
                                          query_lens_cpu=None, **kwargs)


@pytest.mark.parametrize("num_q_heads,num_kv_heads,block_size", [(2, 2, 16), (4, 2, 8), (8, 2, 1), (7, 1, 16)])
def test_mixed_batch_through_dispatch(num_q_heads, num_kv_heads, block_size):
    batch = make_batch(*MIXED, num_q_heads, num_kv_heads, 16, block_size, num_padding_tokens=2)
    out = kernels.paged_attention(**batch)
    torch.testing.assert_close(out, _reference(batch), rtol=1e-5, atol=1e-5)
    assert torch.all(out[-2:] == 0)


def test_shared_blocks_long_context_and_unpadded_head_dim():
    batch = make_batch([2, 3, 20], [40, 39, 20], 4, 2, 24, 8, shared_prefix_blocks=2)
    torch.testing.assert_close(_triton(batch), _reference(batch), rtol=1e-5, atol=1e-5)


# float16 only: the interpreter's tl.dot on bfloat16 returns garbage (Triton 3.8); bench/check_kernels.py
# checks bfloat16 on the GPU.
@pytest.mark.parametrize("dtype", [torch.float16])
def test_half_precision(dtype):
    batch = make_batch([1, 4], [12, 7], 4, 2, 32, 8, dtype=dtype)
    torch.testing.assert_close(_triton(batch).float(), _reference(batch).float(), rtol=2e-2, atol=2e-2)


def test_split_kv_matches_reference_and_looped_segments():
    """Decode-only batch over several 16-token segments: the split (flash-decoding) launch equals
    the reference, and equals the looped-segment launch of the same rows bit for bit."""
    batch = make_batch([1, 1, 1], [50, 16, 33], 4, 2, 16, 8)
    split_out = _triton(batch, kv_split_tokens=16)
    torch.testing.assert_close(split_out, _reference(batch), rtol=1e-5, atol=1e-5)
    looped_out = _triton(dict(batch, max_query_len=2), kv_split_tokens=16)  # max_query_len > 1: looped path
    assert torch.equal(split_out, looped_out)


def test_long_decode_uses_default_split():
    batch = make_batch([1], [paged_attention_module.KV_SPLIT_TOKENS + 37], 2, 1, 16, 16)
    torch.testing.assert_close(_triton(batch), _reference(batch), rtol=1e-5, atol=1e-5)
