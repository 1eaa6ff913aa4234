"""The decode launch that does rotary_store_kv's work itself (FUSED_ROTARY, interpreter) against its
oracle, the two Triton launches it replaces (rotary_store_kv, then paged attention) in the same
interpreter: attention output and both caches bit-identical, on the split (one program per KV
segment) and looped paths, with padding rows. Run by tests/kernels/test_rotary_store_kv_attention.py."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

import vlserve_kernels as kernels
from paged_batch import ATTENTION_ARGS, decode_batch, make_batch

assert os.environ.get("TRITON_INTERPRET") == "1", "run via tests/kernels/test_rotary_store_kv_attention.py"
paged_attention_module = importlib.import_module("vlserve_kernels.paged_attention")

SPLIT = 16   # the interpreter's BLOCK_N is 16: segments of one key block
# Decodes on both sides of segment boundaries (1 to 4 segments); request 4 is a 3-token prefill chunk
# (left out of the decode batch).
LENGTHS = ([1, 1, 1, 1, 3, 1, 1], [15, 16, 17, 33, 20, 50, 64])
DECODES = [0, 1, 2, 3, 5, 6]


def _step(num_q_heads, num_kv_heads, head_dim, mrope_section, dtype, num_padding_requests):
    """A decode batch whose new tokens are not cached yet: unrotated q/k/v, their positions, and the
    slot of each one's last position (-1 for the padding requests, as the decode graphs make them)."""
    mixed = make_batch(*LENGTHS, num_q_heads, num_kv_heads, head_dim, 4, dtype=dtype, seed=head_dim)
    batch = decode_batch(mixed, DECODES, num_padding_requests, max_seq_len=80)
    gen = torch.Generator().manual_seed(num_q_heads)
    num_tokens, block_size = batch["query"].shape[0], batch["k_cache"].shape[1]
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    batch["query"] = torch.randn(batch["query"].shape, generator=gen).to(dtype)
    last = batch["seq_lens"].long() - 1
    slots = batch["block_tables"][torch.arange(num_tokens), last // block_size].long() * block_size + last % block_size
    slots[len(DECODES):] = -1
    positions = last if mrope_section is None else torch.stack([last, last + 3, last + 7])
    cos_sin_cache = torch.randn(128, head_dim, generator=gen).to(dtype)
    return batch, key, value, positions, cos_sin_cache, slots


CASES = [  # num_q_heads, num_kv_heads, head_dim, mrope_section, interleaved, dtype
    (16, 2, 64, None, False, torch.float32), (16, 2, 64, [8, 12, 12], False, torch.float32),
    (4, 2, 32, [4, 6, 6], True, torch.float32), (6, 1, 32, None, False, torch.float32),
    (2, 2, 32, None, False, torch.float16), (8, 2, 64, [8, 12, 12], False, torch.float16),
]


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,mrope_section,interleaved,dtype", CASES)
@pytest.mark.parametrize("path", ["split", "looped"])
def test_fused_launch_equals_rotary_store_kv_then_attention(num_q_heads, num_kv_heads, head_dim, mrope_section,
                                                            interleaved, dtype, path):
    batch, key, value, positions, cos_sin_cache, slots = _step(num_q_heads, num_kv_heads, head_dim, mrope_section,
                                                                 dtype, num_padding_requests=2)
    launch = paged_attention_module.AttentionLaunch(kv_split=SPLIT, split_below=1 << 30 if path == "split" else 1)
    args = [batch[k] for k in ATTENTION_ARGS]
    k_expected, v_expected = batch["k_cache"].clone(), batch["v_cache"].clone()
    rotated = kernels.rotary_store_kv(batch["query"], key, value, positions, cos_sin_cache, k_expected, v_expected,
                                      slots, mrope_section, interleaved)
    expected = paged_attention_module._triton(rotated, k_expected, v_expected, *args[3:],
                                              out=torch.empty_like(rotated), query_lens_cpu=None, launch=launch)
    rotary = paged_attention_module.DecodeRotary(key, value, positions, cos_sin_cache, slots, mrope_section,
                                                 interleaved)
    out = paged_attention_module._triton(*args, out=torch.empty_like(rotated), query_lens_cpu=None, launch=launch,
                                         rotary=rotary)
    assert torch.equal(out, expected)
    assert torch.equal(batch["k_cache"], k_expected) and torch.equal(batch["v_cache"], v_expected)
    assert torch.all(paged_attention_module.TICKETS.buffers[torch.device("cpu")] == 0)


def test_dispatch_fuses_decode_steps_only_where_the_launch_says(monkeypatch):
    batch, key, value, positions, cos_sin_cache, slots = _step(8, 2, 32, None, torch.float32, 0)
    caches = {}
    for fuse in (False, True):
        launch = paged_attention_module.AttentionLaunch(kv_split=SPLIT, fuse_rotary=fuse)
        monkeypatch.setattr(paged_attention_module, "launch_for", lambda device, launch=launch: launch)
        k_cache, v_cache = batch["k_cache"].clone(), batch["v_cache"].clone()
        out = kernels.rotary_store_kv_attention(
            batch["query"], key, value, positions, cos_sin_cache, k_cache, v_cache, slots, batch["query_start_loc"],
            batch["seq_lens"], batch["block_tables"], batch["scale"], 1, batch["max_seq_len"])
        caches[fuse] = (out, k_cache, v_cache)
    assert all(torch.equal(a, b) for a, b in zip(caches[False], caches[True]))


@pytest.mark.parametrize("split_below,fused", [(1 << 30, True), (1, False)])
def test_only_split_decode_launches_take_the_fused_rotary(monkeypatch, split_below, fused):
    """fuse_rotary applies where the decode launch runs its segments in parallel programs; a looped
    launch (here: split_below 1) keeps rotary_store_kv's own launch."""
    batch, key, value, positions, cos_sin_cache, slots = _step(8, 2, 32, None, torch.float32, 0)
    launch = paged_attention_module.AttentionLaunch(kv_split=SPLIT, fuse_rotary=True, split_below=split_below)
    monkeypatch.setattr(paged_attention_module, "launch_for", lambda device: launch)
    seen, original = [], paged_attention_module._triton
    monkeypatch.setattr(paged_attention_module, "_triton",
                        lambda *args, **kw: seen.append(kw.get("rotary") is not None) or original(*args, **kw))
    assert batch["max_seq_len"] > SPLIT
    kernels.rotary_store_kv_attention(
        batch["query"], key, value, positions, cos_sin_cache, batch["k_cache"], batch["v_cache"], slots,
        batch["query_start_loc"], batch["seq_lens"], batch["block_tables"], batch["scale"], 1, batch["max_seq_len"])
    assert seen == [fused]


def test_prefill_launches_refuse_the_fused_rotary():
    batch, key, value, positions, cos_sin_cache, slots = _step(4, 2, 32, None, torch.float32, 0)
    rotary = paged_attention_module.DecodeRotary(key, value, positions, cos_sin_cache, slots, None, False)
    args = [batch[k] for k in ATTENTION_ARGS]
    args[ATTENTION_ARGS.index("max_query_len")] = 2
    with pytest.raises(ValueError, match="decode launches only"):
        paged_attention_module._triton(*args, out=torch.empty_like(batch["query"]), query_lens_cpu=None,
                                       rotary=rotary)
