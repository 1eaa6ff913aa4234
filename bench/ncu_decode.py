"""Nsight Compute targets for the batch-1 decode step's latency-bound kernels (issue 14): one token at
~450 tokens of context (W4-VL's range: four 128-token KV segments), Qwen2.5-VL-3B shapes, launched as
the engine launches them (PDL on, this GPU's tables): the split attention launch with its fused M-RoPE,
then qkv (product + K-range sum), o_proj + residual + norm, gate_up + SiLU and down, all at M = 1.
Each round launches attention and four `_linear_kernel`s; the first round compiles and warms.

    ncu --clock-control none --set full -k regex:'_paged_attention_kernel|_linear_kernel' \
        --launch-skip 5 --launch-count 5 -o OUT/decode python3 bench/ncu_decode.py
Caller: bench/gpu_ncu_call.sh.
"""

from __future__ import annotations

import argparse

import torch

import check_kernels
from check_kernels import BLOCK_SIZE, DEVICE, HEAD_DIM, HIDDEN, INTERMEDIATE, MROPE_SECTION, NUM_KV_HEADS

kernels = check_kernels.kernels


def attention_launch(seq_len: int):
    """The engine's batch-1 decode attention (rotary fused where the table says so) as a closure."""
    batch = check_kernels.make_attention_batch([1], [seq_len], seed=5)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    key, value = (torch.randn(1, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, generator=gen).to(torch.bfloat16)
                  for _ in "kv")
    last = batch["seq_lens"].long() - 1
    positions = torch.stack([last, last - 5, last - 9])
    slots = batch["block_tables"][0, last // BLOCK_SIZE].long() * BLOCK_SIZE + last % BLOCK_SIZE
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, HEAD_DIM, 2, device=DEVICE).float() / HEAD_DIM))
    freqs = torch.arange(4096, device=DEVICE).float()[:, None] * inv_freq[None]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(torch.bfloat16)
    return lambda: kernels.rotary_store_kv_attention(
        batch["query"], key, value, positions, cos_sin, batch["k_cache"], batch["v_cache"], slots,
        batch["query_start_loc"], batch["seq_lens"], batch["block_tables"], batch["scale"], 1, batch["max_seq_len"],
        mrope_section=MROPE_SECTION, query_lens_cpu=[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=450)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def weight(rows, cols):
        return (torch.randn(rows, cols, device=DEVICE, generator=gen) * 0.02).to(torch.bfloat16)

    x, residual = weight(1, HIDDEN), weight(1, HIDDEN)
    w_qkv, b_qkv = weight(2560, HIDDEN), weight(1, 2560)[0]
    w_o, norm_w = weight(HIDDEN, HIDDEN), torch.ones(HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    w_gate_up, w_down = weight(2 * INTERMEDIATE, HIDDEN), weight(HIDDEN, INTERMEDIATE)
    attend = attention_launch(args.seq_len)
    for _ in range(args.rounds):
        attend()
        kernels.batch_invariant_linear(x, w_qkv, b_qkv)
        normed, _ = kernels.batch_invariant_linear_add_rms_norm(x, w_o, None, residual, norm_w, 1e-6)
        kernels.batch_invariant_linear(kernels.batch_invariant_linear_silu_mul(normed, w_gate_up), w_down)
    torch.cuda.synchronize()
    print(f"{args.rounds} rounds done (attention at {args.seq_len} tokens of context)", flush=True)


if __name__ == "__main__":
    main()
