"""kernels.rotary_store_kv_attention: on the CPU (the torch references) it equals rotary_store_kv then
paged_attention, and the dense causal oracle of the rotated step; the Triton kernel, fused decode
launch included, runs in the interpreter (interpreted/rotary_store_kv_attention_cases.py)."""

from __future__ import annotations

import torch

import vlserve_kernels as kernels
from paged_batch import dense_causal_attention, make_batch


def test_reference_path_is_rotary_store_kv_then_attention():
    batch = make_batch([1, 1], [9, 20], 4, 2, 16, 4)
    gen = torch.Generator().manual_seed(1)
    key, value = torch.randn(2, 2, 16, generator=gen), torch.randn(2, 2, 16, generator=gen)
    last = batch["seq_lens"].long() - 1
    slots = batch["block_tables"][torch.arange(2), last // 4].long() * 4 + last % 4
    cos_sin_cache = torch.randn(32, 16, generator=gen)
    k_cache, v_cache = batch["k_cache"].clone(), batch["v_cache"].clone()
    out = kernels.rotary_store_kv_attention(
        batch["query"], key, value, last, cos_sin_cache, k_cache, v_cache, slots, batch["query_start_loc"],
        batch["seq_lens"], batch["block_tables"], batch["scale"], 1, batch["max_seq_len"])
    rotated_q, rotated_k = kernels.apply_rotary(batch["query"], key, last, cos_sin_cache)
    for r, slot in enumerate(slots.tolist()):   # the oracle's cache: this step's rotated K/V in place
        batch["k_cache"][slot // 4, slot % 4] = rotated_k[r]
        batch["v_cache"][slot // 4, slot % 4] = value[r]
    assert torch.equal(k_cache, batch["k_cache"]) and torch.equal(v_cache, batch["v_cache"])
    expected = dense_causal_attention(dict(batch, query=rotated_q))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_triton_kernel_in_interpreter(run_interpreted_cases):
    run_interpreted_cases("rotary_store_kv_attention_cases.py")
