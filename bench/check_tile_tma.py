"""GPU check of the swapped small-M product with TMA weight tiles (kernels/matmul.py `w_tma`, the table's
"tile_tma"): for every tuned shape with swap_ab, at M = 1, 3, 17, 64, the TMA-tiled product (plain,
fused SiLU for gate_up) equals the pointer-tiled one bit for bit, and both are timed (graph replays of one
weight, us). Exits 1 on any difference.

    python bench/check_tile_tma.py
Caller: bench/gpu_fusion_call.sh (PARTS=tiletma).
"""

from __future__ import annotations

import functools
import importlib
import sys

import torch

from tune_linear import graph_us

matmul = importlib.import_module("vlserve_kernels.matmul")


def main() -> int:
    failures = 0
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape, entry in matmul._tuned_for_device(torch.cuda.get_device_name()).items():
        if not entry.get("swap_ab"):
            continue
        num_cols, depth = (int(v) for v in shape.split(","))
        weight = (torch.randn(num_cols, depth, device="cuda", generator=gen) * depth ** -0.5).to(torch.bfloat16)
        bias = torch.randn(num_cols, device="cuda", generator=gen).to(torch.bfloat16)
        silu = isinstance(entry.get("silu_tile"), list)
        for rows in (1, 3, 17, 64):
            x = torch.randn(rows, depth, device="cuda", generator=gen).to(torch.bfloat16)
            tile, num_splits, split_len = matmul.plan(rows, num_cols, depth, True)
            if silu:
                tile = (tile[0], *entry["silu_tile"])
            runs = {w: functools.partial(matmul.launch, x, weight, bias, tile, num_splits, split_len, silu_mul=silu,
                                         swap_ab=True, w_tma=w) for w in (False, True)}
            same = torch.equal(runs[False](), runs[True]())
            failures += not same
            times = {w: graph_us(run) for w, run in runs.items()}
            print(f"{shape} M={rows} tile={tile} silu={silu}: same bits {same}; pointer {times[False]:.2f} us, "
                  f"TMA {times[True]:.2f} us", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
