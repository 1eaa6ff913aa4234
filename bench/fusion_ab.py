"""Time, at M = 1 and 64 as CUDA graph replays, the small-M choices of the batch-invariant linear that
give the same bits, and store the faster in kernels/linear_tiles.json (--write-table):
  split_sum  K ranges summed inside the GEMM launch (ticket counters) vs in a second launch;
  silu_tile  gate_up + SiLU-and-mul fused in one launch (several tiles) vs the product then the activation.
Every candidate is checked bit-equal to the plain path before it may win.

    python bench/fusion_ab.py [--write-table]
Caller: by hand / bench/gpu_check_call.sh on the device.
"""

from __future__ import annotations

import argparse
import json

import torch

from vlserve_kernels import activation, matmul
from tune_linear import SHAPES, graph_us

WEIGHT = {1: 1.0, 64: 0.25}   # decode at batch 1 matters most (W2, one client)


def score(fn) -> tuple[float, dict]:
    us = {m: graph_us(lambda m=m: fn(m)) for m in WEIGHT}
    return sum(WEIGHT[m] * us[m] for m in WEIGHT), us


def split_sum_choice(x, w) -> tuple[str, dict]:
    tile, num_splits, split_len = matmul.plan(1, w.shape[0], w.shape[1], True)
    if num_splits == 1:
        return "in_kernel", {}
    results = {}
    for name, two in (("in_kernel", False), ("two_launch", True)):
        results[name] = score(lambda m, two=two: matmul.launch(x[:m], w, None, tile, num_splits, split_len,
                                                                two_launch=two))
    return min(results, key=lambda k: results[k][0]), results


def silu_choice(x, w) -> tuple[object, dict]:
    tile, num_splits, split_len = matmul.plan(1, w.shape[0], w.shape[1], True)
    want = activation._triton(matmul.launch(x[:64], w, None, tile, num_splits, split_len))
    results = {"unfused": score(lambda m: activation._triton(matmul.launch(x[:m], w, None, tile, num_splits,
                                                                           split_len)))}
    for block_n in (32, 64):
        for block_k, warps, stages in ((64, 4, 4), (128, 4, 4)):
            cand = (64, block_n, block_k, warps, stages)

            def run(m, cand=cand):
                return matmul.launch(x[:m], w, None, cand, num_splits, split_len, silu_mul=True)
            try:
                if not torch.equal(run(64), want):
                    print("  not bit-equal, skipped:", cand, flush=True)
                    continue
                results[json.dumps(list(cand[1:]))] = score(run)
            except Exception as exc:   # out of resources: not a candidate
                print("  skip", cand, type(exc).__name__, flush=True)
    best = min(results, key=lambda k: results[k][0])
    return (best if best == "unfused" else json.loads(best)), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-table", action="store_true")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    table = json.loads(matmul._TUNED_PATH.read_text())
    device = table.setdefault(torch.cuda.get_device_name(), {})
    for name, (n, k) in SHAPES["3b"].items():
        x = torch.randn(64, k, device="cuda", generator=gen).to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(torch.bfloat16)
        entry = device.get(f"{n},{k}")
        choice, results = split_sum_choice(x, w)
        print(f"== {name} ({n}, {k}) split_sum -> {choice}: " + ", ".join(
            f"{key} {us[1]:.1f} / {us[64]:.1f} us" for key, (_, us) in results.items()), flush=True)
        if entry is not None:
            entry.pop("split_sum", None)
            if choice == "two_launch":
                entry["split_sum"] = "two_launch"
        if name == "gate_up":
            silu, results = silu_choice(x, w)
            print(f"== gate_up + silu -> {silu}: " + ", ".join(
                f"{key} {us[1]:.1f} / {us[64]:.1f} us" for key, (_, us) in sorted(results.items(),
                                                                                  key=lambda r: r[1][0])[:6]))
            if entry is not None:
                entry["silu_tile"] = silu
    if args.write_table:
        matmul._TUNED_PATH.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print("wrote", matmul._TUNED_PATH, flush=True)


if __name__ == "__main__":
    main()
