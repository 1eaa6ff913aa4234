"""Triton paged attention (interpreter, CPU tensors) against the torch reference.
Run by tests/kernels/test_paged_attention.py in a child process with TRITON_INTERPRET=1."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import vlserve_kernels as kernels
from paged_batch import ATTENTION_ARGS, MIXED, decode_batch, make_batch

assert os.environ.get("TRITON_INTERPRET") == "1", "run via tests/kernels/test_paged_attention.py"
paged_attention_module = importlib.import_module("vlserve_kernels.paged_attention")


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


# Split-KV cases: 16-token segments (the interpreter's BLOCK_N is 16). STRADDLE's decodes sit on
# both sides of segment boundaries (1, 2, 3 and 4 segments, 1 token past a boundary, exactly on one);
# its 4-token prefill chunk sends the whole batch down the looped path.
SPLIT = 16
STRADDLE = ([1, 1, 1, 4, 1, 1, 1, 1, 1], [15, 16, 17, 20, 32, 33, 50, 1, 64])
STRADDLE_DECODES = [r for r, q_len in enumerate(STRADDLE[0]) if q_len == 1]


def _token_rows(batch, requests):
    return [batch["query_start_loc"].tolist()[r] for r in requests]


def _assert_tickets_clean():
    assert torch.all(paged_attention_module.TICKETS.buffers[torch.device("cpu")] == 0)


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,dtype", [
    (2, 2, 64, torch.float32), (4, 2, 128, torch.float32), (8, 1, 80, torch.float32),
    (12, 2, 32, torch.float32), (16, 2, 64, torch.float16)])
def test_split_rows_match_reference_and_looped_path(num_q_heads, num_kv_heads, head_dim, dtype):
    """GQA groups 1, 2, 8, 6 (a non-power-of-2 group), 8 in half precision: the split launch of the
    decodes equals the reference, and bit for bit the same rows inside the mixed (looped) launch."""
    mixed = make_batch(*STRADDLE, num_q_heads, num_kv_heads, head_dim, 8, dtype=dtype)
    looped = _triton(mixed, kv_split_tokens=SPLIT)
    decodes = decode_batch(mixed, STRADDLE_DECODES)
    split = _triton(decodes, kv_split_tokens=SPLIT)
    _assert_tickets_clean()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(split.float(), _reference(decodes).float(), rtol=tolerance, atol=tolerance)
    assert torch.equal(split, looped[_token_rows(mixed, STRADDLE_DECODES)])


@pytest.mark.parametrize("requests,num_padding_requests", [
    ([6], 0), ([6], 3), ([8, 2], 0), ([1, 0, 5], 1), (list(reversed(STRADDLE_DECODES)), 4)])
def test_split_rows_do_not_depend_on_the_batch(requests, num_padding_requests):
    """Any subset, order and graph-style padding of the decodes, with the grid sized for longer
    sequences (as a graph captured at a larger max_seq_len), gives the same bits per row."""
    mixed = make_batch(*STRADDLE, 8, 2, 64, 16)
    full = _triton(decode_batch(mixed, STRADDLE_DECODES), kv_split_tokens=SPLIT)
    part = _triton(decode_batch(mixed, requests, num_padding_requests, max_seq_len=100), kv_split_tokens=SPLIT)
    _assert_tickets_clean()
    assert torch.equal(part[: len(requests)], full[[STRADDLE_DECODES.index(r) for r in requests]])


def test_split_replays_give_identical_bits():
    """Graph-replay-like reuse: the same out buffer and counters, launch after launch (another batch
    in between), give the same bits and leave every counter at zero."""
    mixed = make_batch(*STRADDLE, 4, 2, 32, 8)
    decodes, other = decode_batch(mixed, STRADDLE_DECODES), decode_batch(mixed, [8, 6], 2)
    out = torch.full_like(decodes["query"], float("nan"))
    call = [decodes[k] for k in ATTENTION_ARGS]
    first = paged_attention_module._triton(*call, out=out, query_lens_cpu=None, kv_split_tokens=SPLIT).clone()
    for _ in range(3):
        _triton(other, kv_split_tokens=SPLIT)
        out.fill_(float("nan"))
        paged_attention_module._triton(*call, out=out, query_lens_cpu=None, kv_split_tokens=SPLIT)
        _assert_tickets_clean()
        assert torch.equal(out, first)


def test_each_active_segment_takes_one_ticket_on_its_own_counter():
    """White box (the interpreter runs programs one by one, so a shared counter would go unseen):
    (decode token t, kv head h) counts on tickets[t * num_kv_heads + h]. Offset one counter so its row
    never draws the last ticket: exactly that row's query heads stay unwritten, the counter advances
    by the row's active segments (4 for 50 tokens, not the grid's 7), and every other row is intact."""
    decodes = decode_batch(make_batch(*STRADDLE, 4, 2, 32, 8), STRADDLE_DECODES, max_seq_len=100)
    expected = _triton(decodes, kv_split_tokens=SPLIT)
    token, kv_head, group, offset = STRADDLE_DECODES.index(6), 1, 2, -100
    counter = token * 2 + kv_head
    tickets = paged_attention_module.TICKETS.buffers[torch.device("cpu")]
    tickets[counter] = offset
    try:
        out = torch.full_like(expected, float("nan"))   # host lengths given: only rows past the batch cleared
        paged_attention_module._triton(*(decodes[k] for k in ATTENTION_ARGS), out=out,
                                       query_lens_cpu=[1] * len(STRADDLE_DECODES), kv_split_tokens=SPLIT)
        assert tickets[counter] == offset + 4
    finally:
        tickets[counter] = 0
    heads = slice(kv_head * group, (kv_head + 1) * group)
    assert torch.all(out[token, heads].isnan())
    out[token, heads] = expected[token, heads]
    assert torch.equal(out, expected)
    _assert_tickets_clean()


def test_long_decode_uses_default_split():
    batch = make_batch([1], [paged_attention_module.KV_SPLIT_TOKENS + 37], 2, 1, 16, 16)
    torch.testing.assert_close(_triton(batch), _reference(batch), rtol=1e-5, atol=1e-5)


def test_split_below_sends_large_decode_batches_down_the_looped_path():
    """AttentionLaunch.split_below: a pure-decode launch with at least that many (request, KV head)
    pairs runs the looped path (no ticket drawn: an offset counter stays as it is) with the same bits
    as the split path; below it the split path runs (the counter advances)."""
    decodes = decode_batch(make_batch(*STRADDLE, 4, 2, 32, 8), STRADDLE_DECODES)
    pairs = len(STRADDLE_DECODES) * 2
    expected = _triton(decodes, kv_split_tokens=SPLIT)
    counter = STRADDLE_DECODES.index(6) * 2 + 1            # token of 50 keys: 4 segments, kv head 1
    tickets = paged_attention_module.TICKETS.buffers[torch.device("cpu")]
    for split_below, advance in ((pairs, 0), (pairs + 1, 4)):
        launch = paged_attention_module.AttentionLaunch(kv_split=SPLIT, split_below=split_below)
        tickets[counter] = -100
        try:
            got = _triton(decodes, launch=launch)
            assert tickets[counter] == -100 + advance, split_below
        finally:
            tickets[counter] = 0
        if advance == 0:
            assert torch.equal(got, expected)
    _assert_tickets_clean()


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(8, 2, 64), (12, 2, 32), (7, 1, 80), (2, 2, 64)])
def test_merge_on_the_token_rows_gives_the_same_bits(num_q_heads, num_kv_heads, head_dim, monkeypatch):
    """AttentionLaunch.merge_rows: the split launch's last program merges on the token's query-head
    rows (groups 4, 6, 7 and 1: padded to 4, 8, 8, 1 rows) with the 64-row merge's bits, and leaves
    every counter at zero."""
    decodes = decode_batch(make_batch(*STRADDLE, num_q_heads, num_kv_heads, head_dim, 8), STRADDLE_DECODES)
    tile = _triton(decodes, launch=paged_attention_module.AttentionLaunch(kv_split=SPLIT))
    merges, token_rows_merge = [], paged_attention_module._merge_token_rows

    def counted(*args, **kwargs):
        merges.append(args[0])
        return token_rows_merge(*args, **kwargs)

    monkeypatch.setattr(paged_attention_module, "_merge_token_rows", counted)
    rows = _triton(decodes, launch=paged_attention_module.AttentionLaunch(kv_split=SPLIT, merge_rows=True))
    _assert_tickets_clean()
    assert merges, "the token-row merge did not run"
    assert torch.equal(rows, tile)
    torch.testing.assert_close(rows, _reference(decodes), rtol=1e-5, atol=1e-5)
