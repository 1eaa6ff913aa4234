"""Sweep the batch-invariant linear's small-M (decode) tiles and K splits on the GPU, timed as CUDA
graph replays (no launch overhead: what a captured decode step sees), at the LM shapes of the
Qwen2.5-VL-3B and -7B. For each shape: the best configs at M = 1 and M = 64, each checked bit for
bit against the large-M tile (rows equal whatever M), with cuBLAS and the weight-read floor.

    python bench/tune_linear.py [--shapes 3b,7b]
Caller: by hand on the device; the chosen table goes into kernels/matmul.py.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os

import torch
import triton

from vlserve_kernels import matmul, matmul_tma

SHAPES = {"3b": {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (22016, 2048), "down": (2048, 11008),
                 "lm_head": (151936, 2048)},
          "7b": {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}}
BANDWIDTH_TB_S = 4.3
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried for the TMA kernel at large M.
TMA_CANDIDATES = [(128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 5),
                  (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4)]
# Mid M (decode buckets 65-512, tuned at 256): also the wide tiles, whose fewer, longer programs may
# amortise the 32-K-block pipeline fill that leaves gate_up and lm_head 60-70% behind cuBLAS at M = 256.
TMA_MID_CANDIDATES = [(64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (128, 64, 64, 4, 4),
                      (128, 128, 64, 8, 3), (64, 256, 64, 4, 3), (64, 64, 128, 4, 4), (128, 256, 64, 8, 3),
                      (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (128, 64, 128, 4, 3)]


_WARM = {}


def warm_clocks(ms: float = 30.0) -> None:
    """Keep the SMs busy for a while before a timing: after seconds of compiling, the GPU idles at
    a low clock and a short replay would be timed before it ramps up."""
    if "x" not in _WARM:
        _WARM["x"] = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    x = _WARM["x"]
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    while True:
        for _ in range(10):
            x @ x
        end.record()
        end.synchronize()
        if start.elapsed_time(end) >= ms:
            return


def graph_us(fn, calls: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    warm_clocks()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[3]


def splits_for(k: int, wanted: int) -> tuple[int, int]:
    blocks = triton.cdiv(k, matmul.BLOCK_K)
    per = triton.cdiv(triton.cdiv(blocks, wanted), 4) * 4
    return triton.cdiv(blocks, per), per * matmul.BLOCK_K


def sweep_shape(n: int, k: int, gen) -> dict:
    x = torch.randn(4096, k, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(torch.bfloat16)
    floor_us = n * k * 2 / (BANDWIDTH_TB_S * 1e6)
    rows = []
    candidates = list(itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (4,), (1, 2, 4, 8, 16)))
    for block_n, block_k, warps, stages, wanted in [(32, 64, 4, 6, 0)] + candidates:   # 0: today's default
        num_splits, split_len = splits_for(k, wanted) if wanted else matmul.k_split(n, k)
        if wanted > 1 and num_splits == 1:
            continue
        tile = (64, block_n, block_k, warps, stages)
        try:
            us = {m: graph_us(lambda m=m: matmul.launch(x[:m], w, None, tile, num_splits, split_len)) for m in (1, 64)}
        except Exception as exc:   # out of shared memory / registers: not a candidate
            print("skip", tile, num_splits, type(exc).__name__, flush=True)
            continue
        rows.append({"tile": tile, "splits": (num_splits, split_len), "us_1": us[1], "us_64": us[64]})
    rows.sort(key=lambda r: r["us_1"] + 0.25 * r["us_64"])
    large = matmul.tile_config(4096, n)
    best = []
    for row in rows[:8]:   # rows of M <= 64 must equal the same rows computed at M = 4096
        num_splits, split_len = row["splits"]
        small = matmul.launch(x[:64], w, None, row["tile"], num_splits, split_len)
        big = matmul.launch(x, w, None, (large[0], large[1], matmul.BLOCK_K, large[2], large[3]), num_splits, split_len)
        row["invariant"] = bool(torch.equal(small, big[:64]))
        best.append(row)
    rows_default = [r for r in rows if r["tile"] == (64, 32, 64, 4, 6)]
    cublas = {m: graph_us(lambda m=m: torch.nn.functional.linear(x[:m], w)) for m in (1, 64)}
    return {"floor_us": floor_us, "cublas_us_1": cublas[1], "cublas_us_64": cublas[64], "best": best,
            "default": rows_default[:1],
            "current": {"splits": matmul.k_split(n, k), "tile": matmul.tile_config(1, n)}}


def sweep_range(n: int, k: int, num_rows: int, gen) -> dict:
    """Tiles for M = num_rows (mid: 256, large: 4096) with the shape's (tuned) K split; each winner
    checked bit-equal, row by row, to the same rows computed alone at M = 1 (the decode path)."""
    x = torch.randn(num_rows, k, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(torch.bfloat16)
    num_splits, split_len = matmul.k_split(n, k)
    default = matmul.tile_config(num_rows, n)
    default_tile = (default[0], default[1], matmul.BLOCK_K, default[2], default[3])
    calls = 20 if num_rows <= 512 else 4
    rows = []
    candidates = (itertools.product((64, 128), (64, 128), (64, 128), (4,), (3, 4)) if num_rows <= 512
                  else itertools.product((128,), (128, 256), (64, 128), (8,), (3, 4, 5)))
    kernels = [(matmul.launch, tile, "pointer") for tile in [default_tile, *candidates]]
    tma_tiles = TMA_CANDIDATES if num_rows > 512 else TMA_MID_CANDIDATES   # kernels/matmul_tma.py competes
    kernels += [(functools.partial(matmul_tma.launch, flat=kind == "tma_flat"), tile, kind)
                for tile in tma_tiles if split_len % tile[2] == 0 for kind in ("tma", "tma_flat")]
    for launch, tile, kind in kernels:
        try:
            us = graph_us(lambda tile=tile, launch=launch: launch(x, w, None, tile, num_splits, split_len), calls)
        except Exception as exc:
            print("skip", kind, tile, type(exc).__name__, flush=True)
            continue
        rows.append({"tile": tile, "kind": kind, "us": us, "tflops": 2 * num_rows * n * k / us / 1e6})
    default_row, ranked = rows[0], sorted(rows[1:], key=lambda r: r["us"])
    alone = torch.cat([matmul._triton(x[i:i + 1], w, None) for i in (0, num_rows // 2, num_rows - 1)])
    best = []
    for row in ranked[:6]:
        launch = (functools.partial(matmul_tma.launch, flat=row["kind"] == "tma_flat")
                  if row["kind"].startswith("tma") else matmul.launch)
        out = launch(x, w, None, row["tile"], num_splits, split_len)
        row["invariant"] = bool(torch.equal(out[[0, num_rows // 2, num_rows - 1]], alone))
        best.append(row)
    cublas = graph_us(lambda: torch.nn.functional.linear(x, w), calls)
    return {"rows": num_rows, "default": default_row, "best": best, "cublas_us": cublas}


def write_range(result: dict, name_of_range: str) -> None:
    path = matmul._TUNED_PATH
    table = json.loads(path.read_text()) if path.exists() else {}
    device = table.setdefault(torch.cuda.get_device_name(), {})
    for name, entry in result.items():
        n, k = SHAPES[name.split("/")[0]][name.split("/")[1]]
        winners = [row for row in entry["best"] if row["invariant"]]
        if not (winners and winners[0]["us"] < entry["default"]["us"] and f"{n},{k}" in device):
            continue
        shape = device[f"{n},{k}"]
        pointer = [row for row in winners if row["kind"] == "pointer"]
        if pointer:
            shape[name_of_range] = list(pointer[0]["tile"])
        shape.pop(f"{name_of_range}_tma", None)
        shape.pop(f"{name_of_range}_tma_flat", None)
        if winners[0]["kind"].startswith("tma"):   # used for 16-bit inputs; the pointer tile stays the fallback
            shape[f"{name_of_range}_tma"] = list(winners[0]["tile"])
            if winners[0]["kind"] == "tma_flat":
                shape[f"{name_of_range}_tma_flat"] = True
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print("wrote", path, flush=True)


def write_table(result: dict) -> None:
    """The fastest bit-invariant config per shape, faster than the default, for this GPU model."""
    path = matmul._TUNED_PATH
    table = json.loads(path.read_text()) if path.exists() else {}
    device = table.setdefault(torch.cuda.get_device_name(), {})
    for name, entry in result.items():
        n, k = SHAPES[name.split("/")[0]][name.split("/")[1]]
        winners = [row for row in entry["best"] if row["invariant"]]
        default = entry["default"][0]["us_1"] + 0.25 * entry["default"][0]["us_64"] if entry["default"] else float("inf")
        if winners and winners[0]["us_1"] + 0.25 * winners[0]["us_64"] < default:
            device[f"{n},{k}"] = {"tile": list(winners[0]["tile"][1:]), "splits": list(winners[0]["splits"]),
                                  "us_m1": round(winners[0]["us_1"], 2), "us_m64": round(winners[0]["us_64"], 2)}
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print("wrote", path, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="3b")
    parser.add_argument("--write-table", action="store_true", help="store the winners in kernels/linear_tiles.json")
    parser.add_argument("--range", choices=("small", "mid", "large"), default="small",
                        help="small: M <= 64 tiles and K splits; mid (M = 256) / large (M = 4096): tiles only")
    args = parser.parse_args()
    gen, result = torch.Generator(device="cuda").manual_seed(0), {}
    if args.range != "small":
        num_rows = 256 if args.range == "mid" else 4096
        for family in args.shapes.split(","):
            for name, (n, k) in SHAPES[family].items():
                if args.range == "large" and name == "lm_head":
                    continue   # logits are computed for the sampling rows only (M <= max_num_seqs)
                entry = result[f"{family}/{name}"] = sweep_range(n, k, num_rows, gen)
                d = entry["default"]
                print(f"== {family}/{name} M={num_rows}: cuBLAS {entry['cublas_us']:.1f} us; default {d['tile']} "
                      f"{d['us']:.1f} us ({d['tflops']:.0f} TFLOP/s)", flush=True)
                for row in entry["best"]:
                    print(f"   {row['kind']} tile {row['tile']}: {row['us']:.1f} us ({row['tflops']:.0f} TFLOP/s) "
                          f"invariant={row['invariant']}", flush=True)
        if args.write_table:
            write_range(result, args.range)
        return
    for family in args.shapes.split(","):
        for name, (n, k) in SHAPES[family].items():
            entry = result[f"{family}/{name}"] = sweep_shape(n, k, gen)
            print(f"== {family}/{name} N={n} K={k}: floor {entry['floor_us']:.1f} us, cuBLAS {entry['cublas_us_1']:.1f} / "
                  f"{entry['cublas_us_64']:.1f} us (M=1 / 64)", flush=True)
            for row in entry["default"] + entry["best"]:
                print(f"   tile {row['tile']} splits {row['splits']}: {row['us_1']:.1f} / {row['us_64']:.1f} us "
                      f"invariant={row.get('invariant')}", flush=True)
    if args.write_table:
        write_table(result)
    out = os.environ.get("OUT", "bench/results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tune_linear.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
