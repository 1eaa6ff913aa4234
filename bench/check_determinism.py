"""Determinism on the GPU: (1) the linear layers' row results bit for bit across batch sizes
(cuBLAS F.linear vs kernels.batch_invariant_linear) at the Qwen2.5-VL-3B LM shapes, with
timings, the in-kernel split-K sum equal to the former two-launch sum over many CUDA graph
replays (the memory ordering of the tile counters), and the fused gate_up + SiLU-and-mul equal to
the linear followed by silu_and_mul; (2) end to end: 64 identical temperature-0 requests (one image + text) submitted among
256 others of random lengths and images give 64 identical outputs, equal to the request run
alone (and the same for a text-only request). Exits 1 when (2) fails with deterministic on.

    python bench/check_determinism.py [--no-deterministic] [--output-tokens 64]
Caller: by hand, bench/run_all.py.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch
import triton

import harness

LM_SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (22016, 2048), "down": (2048, 11008),
             "lm_head": (151936, 2048)}
ROW_COUNTS = (1, 3, 17, 64, 65, 130, 256, 1000, 4096)


def linear_invariance() -> dict:
    import vlserve_kernels as kernels

    result = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in LM_SHAPES.items():
        x = torch.randn(max(ROW_COUNTS), k, device="cuda", generator=gen).to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(torch.bfloat16)
        entry = {}
        for label, fn in (("cublas", torch.nn.functional.linear), ("invariant", kernels.batch_invariant_linear)):
            alone = fn(x[:1], w)
            same = all(torch.equal(fn(x[:m], w)[:1], alone) for m in ROW_COUNTS)
            ms = {m: triton.testing.do_bench(lambda m=m: fn(x[:m], w), warmup=5, rep=20) for m in (1, 64, 256, 4096)}
            entry[label] = {"rows_invariant": same, "ms": ms}
        ref = x[:64].double() @ w.double().T
        got = kernels.batch_invariant_linear(x[:64], w).double()
        entry["invariant_rel_error"] = ((got - ref).norm() / ref.norm()).item()
        result[name] = entry
    return result


def split_sum_oracle(replays: int = 200) -> dict:
    """Small M at the split shapes: the in-kernel sum of the K ranges (tile counters, one launch)
    against the two-launch oracle, eagerly and over `replays` CUDA graph replays (a memory-ordering
    slip shows as a replay whose bits differ, or a counter left non-zero)."""
    from vlserve_kernels import matmul

    result, gen = {}, torch.Generator(device="cuda").manual_seed(1)
    for name, (n, k) in LM_SHAPES.items():
        x = torch.randn(64, k, device="cuda", generator=gen).to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(torch.bfloat16)
        for m in (1, 3, 17, 64):
            tile, num_splits, split_len = matmul.plan(m, n, k, True)
            oracle = matmul.launch(x[:m], w, None, tile, num_splits, split_len, two_launch=True)
            eager = matmul.launch(x[:m], w, None, tile, num_splits, split_len)
            graph, outs = torch.cuda.CUDAGraph(), []
            with torch.cuda.graph(graph):
                outs = [matmul.launch(x[:m], w, None, tile, num_splits, split_len) for _ in range(4)]
            bad = 0
            for _ in range(replays // 4):
                graph.replay()
                bad += sum(not torch.equal(out, oracle) for out in outs)
            counters = matmul.TILE_COUNTERS.buffers.get(x.device)
            result[f"{name} M={m}"] = {"splits": num_splits, "eager_equal": torch.equal(eager, oracle),
                                       "bad_replays": bad, "counters_clean": counters is None or not counters.any().item()}
    return result


def fused_silu_mul_oracle() -> dict:
    """kernels.batch_invariant_linear_silu_mul against silu_and_mul(batch_invariant_linear) at the
    gate_up shape, bit for bit at every M path (a 2-range split shape too: the in-kernel sum)."""
    import vlserve_kernels as kernels

    result, gen = {}, torch.Generator(device="cuda").manual_seed(2)
    for n, k in (LM_SHAPES["gate_up"], LM_SHAPES["down"]):   # down's shape: 4 K ranges at small M
        x = torch.randn(max(ROW_COUNTS), k, device="cuda", generator=gen).to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).to(torch.bfloat16)
        for m in ROW_COUNTS:
            fused = kernels.batch_invariant_linear_silu_mul(x[:m], w)
            result[f"{n}x{k} M={m}"] = torch.equal(fused, kernels.silu_and_mul(kernels.batch_invariant_linear(x[:m], w)))
    return result


def engine_invariance(llm, output_tokens: int, seed: int = 5) -> dict:
    from engine.sampling_params import SamplingParams

    tokenizer, rng = llm.get_tokenizer(), random.Random(seed)
    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    image = harness.fresh_images(1, (448, 448), seed)[0]
    probes = {"image": {"prompt": harness.IMAGE_PROMPT + harness.text_of_tokens(tokenizer, 64, seed),
                        "multi_modal_data": {"image": image}},
              "text": {"prompt": harness.text_of_tokens(tokenizer, 40, seed + 1)}}
    result = {}
    for name, probe in probes.items():
        alone = llm.generate([probe], params, use_tqdm=False)[0].outputs[0].token_ids
        others = []
        images = harness.fresh_images(256, (448, 448), seed + 7)
        for i in range(256):
            text = harness.text_of_tokens(tokenizer, rng.randint(4, 600), seed * 1000 + i)
            size = (rng.choice([224, 448, 640]), rng.choice([224, 448, 480]))
            others.append({"prompt": harness.IMAGE_PROMPT + text,
                           "multi_modal_data": {"image": images[i].resize(size)}} if i % 2 else {"prompt": text})
        prompts = others[:]
        for j in range(64):
            prompts.insert(rng.randint(0, len(prompts)), probe)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        probe_outputs = [o.outputs[0].token_ids for p, o in zip(prompts, outputs) if p is probe]
        distinct = {tuple(t) for t in probe_outputs}
        result[name] = {"identical_among_64": len(distinct) == 1, "equal_to_alone": distinct == {tuple(alone)},
                        "distinct_outputs": len(distinct), "output_tokens": output_tokens}
    return result


def report(result: dict) -> None:
    rows = []
    for name, entry in result.get("linear", {}).items():
        for label in ("cublas", "invariant"):
            ms = entry[label]["ms"]
            rows.append((f"{name:8s} {label:9s} rows invariant", entry[label]["rows_invariant"]))
            rows.append((f"{name:8s} {label:9s} ms @M=1/64/256/4096",
                         " / ".join(f"{ms[m]:.3f}" for m in (1, 64, 256, 4096))))
        rows.append((f"{name:8s} invariant rel err vs fp64", f"{entry['invariant_rel_error']:.2e}"))
    for name, entry in result.get("split_sum", {}).items():
        rows.append((f"{name:14s} in-kernel split sum == two-launch (eager, bad replays, counters clean)",
                     f"{entry['eager_equal']}, {entry['bad_replays']}, {entry['counters_clean']}"))
    for name, equal in result.get("fused_silu_mul", {}).items():
        rows.append((f"fused gate_up+silu {name} == linear then silu_and_mul", equal))
    for name, entry in result.get("engine", {}).items():
        rows.append((f"engine {name} probe: 64 identical", entry["identical_among_64"]))
        rows.append((f"engine {name} probe: equal to alone", entry["equal_to_alone"]))
    rows.append(("deterministic mode", result.get("deterministic")))
    harness.print_table("Determinism (batch invariance)", rows)
    print("  json:", harness.write_json("check_determinism", result))


def passed(result: dict) -> bool:
    split_ok = all(e["eager_equal"] and not e["bad_replays"] and e["counters_clean"]
                   for e in result.get("split_sum", {}).values())
    split_ok = split_ok and all(result.get("fused_silu_mul", {}).values())
    return split_ok and all(e["identical_among_64"] and e["equal_to_alone"] for e in result.get("engine", {}).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2_5_vl_3b")
    parser.add_argument("--no-deterministic", action="store_true")
    parser.add_argument("--output-tokens", type=int, default=64)
    args = parser.parse_args()
    result = {"linear": linear_invariance(), "split_sum": split_sum_oracle(), "fused_silu_mul": fused_silu_mul_oracle(),
              "deterministic": not args.no_deterministic}
    llm, _ = harness.make_llm(harness.model_dir(args.model), max_model_len=4096,
                              deterministic=not args.no_deterministic)
    result["engine"] = engine_invariance(llm, args.output_tokens)
    report(result)
    if result["deterministic"] and not passed(result):
        sys.exit(1)


if __name__ == "__main__":
    main()
