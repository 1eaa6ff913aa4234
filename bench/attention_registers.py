"""Registers and spills of the paged-attention kernel compiled for Hopper (sm_90a) on this machine, no
GPU needed: Triton's own compiler and ptxas (bundled with Triton) with `-v`. Spills cost local-memory
round trips inside a latency-bound launch, so a change to the kernel's tiles or merge shows here
before any device time is spent. The device image's Triton may allocate differently: confirm on a GPU.

    python bench/attention_registers.py [--fused 0 1] [--split 0 1] [--block-n 64 32]
        [--tile 64:4 16:1]   (ROWS:WARPS, the program's row tile; the engine's is 64:4) [--merge-rows 0 1]
Caller: by hand.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

attention = importlib.import_module("vlserve_kernels.paged_attention")
POINTERS = {"tickets_ptr": "*i32", "query_start_loc_ptr": "*i32", "seq_lens_ptr": "*i32", "block_tables_ptr": "*i32",
            "slot_mapping_ptr": "*i64", "positions_ptr": "*i64", "partial_acc_ptr": "*fp32",
            "partial_max_ptr": "*fp32", "partial_sum_ptr": "*fp32"}   # every other pointer: bf16 tensors


def ptxas_report(constexprs: dict, num_warps: int, num_stages: int) -> str:
    """'N registers, S bytes spill stores, L bytes spill loads' for one specialisation."""
    kernel = attention._paged_attention_kernel
    signature = {name: "constexpr" if name in constexprs else POINTERS.get(name, "*bf16") if name.endswith("_ptr")
                 else "fp32" if name == "scale" else "i32" for name in kernel.arg_names}
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptxas = os.path.join(os.path.dirname(importlib.import_module("triton.backends.nvidia").__file__), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as handle:
            handle.write(compiled.asm["ptx"])
        log = subprocess.run([ptxas, "-v", "-arch=sm_90a", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (f"{registers.group(1) if registers else '?'} registers, {spills.group(1) if spills else 0} bytes spill "
            f"stores, {spills.group(2) if spills else 0} bytes spill loads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fused", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--split", type=int, nargs="+", default=[1, 0])
    parser.add_argument("--block-n", type=int, nargs="+", default=[64])
    parser.add_argument("--tile", nargs="+", default=["64:4"], help="ROWS:WARPS, the program's row tile")
    parser.add_argument("--merge-rows", type=int, nargs="+", default=[0],
                        help="split launches: 1 merges on the token's query-head rows (AttentionLaunch.merge_rows)")
    args = parser.parse_args()
    for tile, block_n, fused, split, merge_rows in itertools.product(args.tile, args.block_n, args.fused, args.split,
                                                                      args.merge_rows):
        rows, warps = (int(part) for part in tile.split(":"))
        launch = attention.AttentionLaunch(kv_split=128, block_n=block_n, split_stages=2, loop_stages=2)   # H200
        constexprs = dict(GROUP=8, BLOCK_Q=rows // 8, BLOCK_M=rows, BLOCK_N=launch.block_n, DIM_PADDED=128,
                          BLOCK_SIZE=16,
                          SPLIT_TOKENS=launch.kv_split, IS_SPLIT=bool(split), DOT_PRECISION="tf32", PDL=True,
                          FUSED_ROTARY=bool(fused), IS_MROPE=bool(fused), IS_INTERLEAVED=False,
                          GROUP_PADDED=8 if fused else 1, HALF_PADDED=64 if fused else 1,
                          MERGE_ROWS=8 if merge_rows and split else 0)
        stages = launch.split_stages if split else launch.loop_stages
        print(f"Qwen2.5-VL-3B (group 8, head_dim 128) tile {rows} rows x {warps} warps, block_n={block_n} "
              f"split={split} fused_rotary={fused} merge_rows={merge_rows}: "
              f"{ptxas_report(constexprs, warps, stages)}", flush=True)


if __name__ == "__main__":
    main()
