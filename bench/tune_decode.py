"""Decode-path tuning on the GPU with cold memory (issue 14): what a decode step's kernels cost when
their weights / KV come from HBM, not from L2 as in a loop over one weight (bench/tune_linear.py).

  linear     the batch-invariant linear's small-M configs at the 3B LM shapes, M = 1 and 64: tile,
             K split, the in-kernel or two-launch split sum, and the swapped product (weight as the
             tensor core's 64-row operand); every winner checked bit for bit against the large-M
             kernel (pointer and TMA) with the same K split. Each call reads its own weight copy.
  silu       gate_up + SiLU in one launch (plain and swapped tiles) against the product then the activation
  attention  paged attention's launch (kernels/paged_attention.AttentionLaunch) and KV segment:
             decode at batch 1 (W2), 64 and 256 (W1), and a prefill chunk (looped path); split and
             looped paths checked bit-equal for every (segment, BLOCK_N, num_warps).

    python bench/tune_decode.py --part linear,attention [--write-table] [--compile-workers 14]
Kernels are compiled first by worker processes into Triton's cache (the GPU host has 16 cores),
then timed in this process as CUDA graph replays. Output: a table on stdout, JSON in $OUT.
Caller: by hand on the device (bench/gpu_tune_call.sh).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import multiprocessing
import os
import time
from dataclasses import dataclass

import torch
import triton

import vlserve_kernels as kernels
from vlserve_kernels import matmul, matmul_tma
from tune_linear import BANDWIDTH_TB_S, SHAPES, graph_us, splits_for

attention = importlib.import_module("vlserve_kernels.paged_attention")   # the package's name is the function
COLD_BYTES = 192 << 20     # > 3x the H200's 50 MB L2: every call reads its weight from HBM


@dataclass(frozen=True)
class LinearConfig:
    block_n: int
    block_k: int
    num_stages: int
    num_splits: int
    split_len: int
    swap_ab: bool
    two_launch: bool = False

    def tile(self, num_rows: int) -> tuple[int, int, int, int, int]:
        block_m = matmul.swap_rows(num_rows) if self.swap_ab else 64
        return block_m, self.block_n, self.block_k, 4, self.num_stages

    def run(self, x: torch.Tensor, w: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
        return matmul.launch(x, w, None, self.tile(x.shape[0]), self.num_splits, self.split_len,
                             two_launch=self.two_launch, silu_mul=silu_mul, swap_ab=self.swap_ab)


def linear_configs(n: int, k: int) -> list[LinearConfig]:
    configs = []
    for swap, block_n, block_k, stages, wanted in itertools.product(
            (False, True), (16, 32, 64, 128), (128, 256), (4, 8), (1, 2, 4, 8)):
        if swap != (block_n >= 64) or (wanted == 8 and k < 8192):
            continue   # the swapped dot needs 64 weight rows; the plain one streams narrow tiles
        num_splits, split_len = splits_for(k, wanted)
        programs = triton.cdiv(n, block_n) * num_splits
        if (wanted > 1 and num_splits == 1) or split_len % block_k or (n < 100_000 and not 64 <= programs <= 1400):
            continue
        if n >= 100_000 and (num_splits > 1 or block_k == 256):
            continue   # lm_head: thousands of tiles already
        for two_launch in ((False, True) if num_splits > 1 else (False,)):
            configs.append(LinearConfig(block_n, block_k, stages, num_splits, split_len, swap, two_launch))
    return configs


def linear_inputs(n: int, k: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(4096, k, device="cuda", generator=gen).to(torch.bfloat16)
    copies = max(1, triton.cdiv(COLD_BYTES, n * k * 2))
    w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(torch.bfloat16)
    return x, [w] + [w.clone() for _ in range(copies - 1)]


def cold_us(fn, weights: list[torch.Tensor]) -> float:
    """us per call, each call of the captured sequence on the next weight copy."""
    calls = max(20, len(weights))
    order = itertools.cycle(weights)
    return graph_us(lambda: fn(next(order)), calls)


def current_path_us(x: torch.Tensor, weights: list[torch.Tensor]) -> dict:
    return {m: cold_us(lambda w, m=m: matmul._triton(x[:m], w, None), weights) for m in (1, 64)}


def invariant(config: LinearConfig, n: int, k: int, x: torch.Tensor, w: torch.Tensor) -> bool:
    """Rows at M = 1 and 64 equal the same rows of the large-M pointer kernel and, where the shape's
    TMA tile divides the split, of the TMA kernel at M = 256 (the mid path), same K split."""
    big = matmul.launch(x, w, None, (128, 256, 64, 8, 3), config.num_splits, config.split_len)
    same = all(torch.equal(config.run(x[:m], w), big[:m]) for m in (1, 20, 64))
    entry = matmul.tuned_entry(n, k) or {}
    tma = entry.get("mid_tma")
    if tma and config.split_len % tma[2] == 0 and matmul_tma.supports(x, w):
        mid = matmul_tma.launch(x[:256], w, None, tuple(tma), config.num_splits, config.split_len)
        same = same and torch.equal(mid[:64], big[:64])
    return same


def tune_linear_shape(name: str, n: int, k: int) -> dict:
    x, weights = linear_inputs(n, k, seed=n + k)
    floor_us = n * k * 2 / (BANDWIDTH_TB_S * 1e6)
    now = current_path_us(x, weights)
    rows = []
    for config in linear_configs(n, k):
        try:
            us = {m: cold_us(lambda w, m=m, c=config: c.run(x[:m], w), weights) for m in (1, 64)}
        except Exception as exc:   # out of shared memory / registers: not a candidate
            print("skip", config, type(exc).__name__, flush=True)
            continue
        rows.append({"config": config, "us_1": us[1], "us_64": us[64]})
    rows.sort(key=lambda r: r["us_1"] + 0.25 * r["us_64"])
    best = []
    for row in rows[:6]:
        row["invariant"] = invariant(row["config"], n, k, x, weights[0])
        best.append(row)
    cublas = {m: cold_us(lambda w, m=m: torch.nn.functional.linear(x[:m], w), weights) for m in (1, 64)}
    print(f"== {name} N={n} K={k}: floor {floor_us:.1f} us; now {now[1]:.1f} / {now[64]:.1f} us (M=1 / 64); "
          f"cuBLAS {cublas[1]:.1f} / {cublas[64]:.1f}; {len(rows)} configs", flush=True)
    for row in best:
        print(f"   {row['config']}: {row['us_1']:.1f} / {row['us_64']:.1f} us "
              f"({n * k * 2 / row['us_1'] / 1e6:.2f} TB/s) invariant={row['invariant']}", flush=True)
    return {"n": n, "k": k, "floor_us": floor_us, "now_us": now, "cublas_us": cublas,
            "best": [dict(r, config=r["config"].__dict__) for r in best]}


def write_linear_table(result: dict) -> None:
    """Store each shape's fastest bit-invariant small-M config when it beats today's path at M = 1.
    A new K split drops the mid / large TMA tiles it no longer divides (they fall back to pointer)."""
    path = matmul._TUNED_PATH
    table = json.loads(path.read_text()) if path.exists() else {}
    device = table.setdefault(torch.cuda.get_device_name(), {})
    for entry in result.values():
        winners = [row for row in entry["best"] if row["invariant"]]
        if not winners or winners[0]["us_1"] >= entry["now_us"][1]:
            continue
        c = winners[0]["config"]
        shape = device.setdefault(f"{entry['n']},{entry['k']}", {})
        shape.update({"tile": [c["block_n"], c["block_k"], 4, c["num_stages"]],
                      "splits": [c["num_splits"], c["split_len"]],
                      "us_m1": round(winners[0]["us_1"], 2), "us_m64": round(winners[0]["us_64"], 2)})
        for key, on in (("swap_ab", c["swap_ab"]), ("split_sum", c["two_launch"])):
            shape.pop(key, None)
            if on:
                shape[key] = True if key == "swap_ab" else "two_launch"
        for key in ("mid_tma", "large_tma", "mid", "large"):
            if key in shape and c["split_len"] % shape[key][2]:
                shape.pop(key)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print("wrote", path, flush=True)


# --- attention ------------------------------------------------------------------------------------

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 2, 128, 16   # Qwen2.5-VL-3B's LM
CASES = {"decode b1 s300": (1, 300, 1), "decode b1 s530": (1, 530, 1), "decode b64 s450": (64, 450, 1),
         "decode b256 s450": (256, 450, 1), "prefill 16x322": (16, 322, 322)}


def attention_batch(batch: int, seq_len: int, q_len: int, seed: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    per_seq = triton.cdiv(seq_len, BLOCK_SIZE)
    num_blocks = batch * per_seq + 8
    cache_shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(cache_shape, device="cuda", generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(cache_shape, device="cuda", generator=gen).to(torch.bfloat16)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen)[: batch * per_seq]
    return {"query": torch.randn(batch * q_len, NUM_Q_HEADS, HEAD_DIM, device="cuda", generator=gen).to(torch.bfloat16),
            "k_cache": k_cache, "v_cache": v_cache,
            "query_start_loc": torch.arange(0, batch * q_len + 1, q_len, device="cuda", dtype=torch.int32),
            "seq_lens": torch.full((batch,), seq_len, device="cuda", dtype=torch.int32),
            "block_tables": perm.view(batch, per_seq).to(torch.int32), "max_query_len": q_len,
            "max_seq_len": seq_len, "query_lens_cpu": [q_len] * batch}


def run_attention(batch: dict, launch, force_loop: bool = False):
    out = torch.empty_like(batch["query"])
    return attention._triton(batch["query"], batch["k_cache"], batch["v_cache"], batch["query_start_loc"],
                             batch["seq_lens"], batch["block_tables"], HEAD_DIM ** -0.5,
                             2 if force_loop else batch["max_query_len"], batch["max_seq_len"], out,
                             batch["query_lens_cpu"], launch=launch)


def attention_configs() -> list:
    configs = []
    for kv_split, block_n, warps, stages in itertools.product((128, 256), (32, 64), (4,), (2, 3)):
        if kv_split % block_n == 0:
            configs.append(attention.AttentionLaunch(kv_split, block_n, warps, stages, stages))
    return configs


def tune_attention() -> dict:
    """Each config: the split path (decodes) and the looped path (every case) timed; split == loop."""
    batches = {name: attention_batch(*shape, seed=i) for i, (name, shape) in enumerate(CASES.items())}
    rows = []
    for launch in attention_configs():
        us = {name: graph_us(lambda b=b, c=launch: run_attention(b, c), 10) for name, b in batches.items()}
        loop_us = {name: graph_us(lambda b=b, c=launch: run_attention(b, c, force_loop=True), 10)
                   for name, b in batches.items() if name.startswith("decode")}
        same = all(torch.equal(run_attention(batches[n], launch), run_attention(batches[n], launch, force_loop=True))
                   for n in ("decode b64 s450", "decode b1 s530"))
        rows.append({"launch": launch.__dict__, "us": us, "loop_us": loop_us, "split_equals_loop": same})
        print(f"   {launch}: " + ", ".join(f"{n} {v:.1f}" for n, v in us.items())
              + "; looped: " + ", ".join(f"{n} {v:.1f}" for n, v in loop_us.items())
              + f" us; split == loop: {same}", flush=True)
    return {"rows": rows}


def tune_silu() -> dict:
    """gate_up + SiLU-and-mul at M = 1 / 64, cold: the product then the activation (today's path)
    against one launch (kernels.matmul's SILU_MUL), plain and swapped tiles; bits checked."""
    n, k = SHAPES["3b"]["gate_up"]
    x, weights = linear_inputs(n, k, seed=5)
    unfused = {m: cold_us(lambda w, m=m: kernels.batch_invariant_linear_silu_mul(x[:m], w), weights) for m in (1, 64)}
    rows = [{"config": "today", "us_1": unfused[1], "us_64": unfused[64], "same": True}]
    for config in silu_configs(k):
        try:
            us = {m: cold_us(lambda w, m=m, c=config: c.run(x[:m], w, silu_mul=True), weights) for m in (1, 64)}
        except Exception as exc:
            print("skip", config, type(exc).__name__, flush=True)
            continue
        want = kernels.silu_and_mul(matmul.launch(x[:64], weights[0], None, (64, 64, 64, 4, 4), config.num_splits,
                                                  config.split_len))
        same = torch.equal(config.run(x[:64], weights[0], silu_mul=True), want)
        rows.append({"config": config.__dict__, "us_1": us[1], "us_64": us[64], "same": same})
    rows.sort(key=lambda r: r["us_1"])
    for row in rows[:8]:
        print(f"   silu {row['config']}: {row['us_1']:.1f} / {row['us_64']:.1f} us, same bits: {row['same']}",
              flush=True)
    return {"rows": rows}


def silu_configs(k: int) -> list[LinearConfig]:
    configs = []
    for swap, block_n, block_k, stages, wanted in itertools.product((False, True), (32, 64), (64, 128), (3, 4, 6),
                                                                    (1, 2)):
        if swap != (block_n == 64):
            continue
        num_splits, split_len = splits_for(k, wanted)
        configs.append(LinearConfig(block_n, block_k, stages, num_splits, split_len, swap))
    return configs


# --- compile in parallel --------------------------------------------------------------------------

def compile_jobs(parts: list[str]) -> list[tuple]:
    jobs = []
    if "linear" in parts:
        for n, k in SHAPES["3b"].values():
            jobs += [("linear", n, k, config) for config in linear_configs(n, k)]
    if "attention" in parts:
        jobs += [("attention", launch) for launch in attention_configs()]
    if "silu" in parts:
        n, k = SHAPES["3b"]["gate_up"]
        jobs += [("silu", n, k, config) for config in silu_configs(k)]
    return jobs


def compile_share(parts: list[str], worker: int, workers: int) -> None:
    """Run every workers-th job once (compiling it into Triton's on-disk cache)."""
    small = {}
    for index, job in enumerate(compile_jobs(parts)):
        if index % workers != worker:
            continue
        try:
            if job[0] in ("linear", "silu"):
                kind, n, k, config = job
                if (n, k) not in small:
                    small[(n, k)] = (torch.randn(64, k, device="cuda").to(torch.bfloat16),
                                     torch.randn(n, k, device="cuda").to(torch.bfloat16))
                x, w = small[(n, k)]
                for m in (1, 64):
                    config.run(x[:m], w, silu_mul=kind == "silu")
            else:
                _, launch = job
                for shape in ((1, 530, 1), (2, 100, 100)):
                    run_attention(attention_batch(*shape, seed=0), launch)
        except Exception as exc:
            print("compile skip", job[:1], type(exc).__name__, flush=True)
    torch.cuda.synchronize()


def compile_all(parts: list[str], workers: int) -> None:
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=compile_share, args=(parts, i, workers)) for i in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    print(f"compiled {len(compile_jobs(parts))} configs in {time.perf_counter() - start:.0f} s "
          f"({workers} processes)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="linear,attention")
    parser.add_argument("--write-table", action="store_true", help="store linear winners in kernels/linear_tiles.json")
    parser.add_argument("--compile-workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    args = parser.parse_args()
    parts = args.part.split(",")
    compile_all(parts, args.compile_workers)
    result: dict = {}
    if "linear" in parts:
        result["linear"] = {name: tune_linear_shape(name, n, k) for name, (n, k) in SHAPES["3b"].items()}
        if args.write_table:
            write_linear_table(result["linear"])
    if "attention" in parts:
        result["attention"] = tune_attention()
    if "silu" in parts:
        result["silu"] = tune_silu()
    out = os.environ.get("OUT", "bench/results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tune_decode.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
