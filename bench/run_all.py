"""Engine workloads and baselines, in parts that bench/run_gpu.sh runs in separate processes (so
each part starts with a free GPU): `linear` (row invariance of the linear layers), `det` (one
deterministic engine: W2 + W1 + the determinism check), `nondet` (W1 with --no-deterministic:
the cost of determinism), `hf` (transformers baselines for W2 and W1), `w3` (vision tower, ours
and HF). Each part writes bench/results/run_all_<part>.json; `--summarize` prints one table of all.

    python bench/run_all.py --parts det,nondet [--runs 5]   |   python bench/run_all.py --summarize
Caller: bench/run_gpu.sh.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

import check_determinism
import harness
import w1_throughput
import w2_latency
import w3_vision


def _guarded(summary: dict, name: str, fn):
    start = time.perf_counter()
    try:
        value = fn()
    except Exception as exc:   # one workload failing must not hide the others' numbers
        traceback.print_exc()
        summary[name] = f"FAILED: {type(exc).__name__}: {exc}"[:300]
        return None
    print(f"[{name}: {time.perf_counter() - start:.1f} s]", flush=True)
    return value


def engine_workloads(args, path: str, summary: dict, deterministic: bool, runs: int) -> None:
    tag = "det" if deterministic else "nondet"
    made = _guarded(summary, f"engine start ({tag})", lambda: harness.make_llm(
        path, max_model_len=4096, deterministic=deterministic))
    if made is None:
        return
    llm, start_s = made
    del made   # the engine must be freeable at the end of this function
    summary[f"engine start s ({tag})"] = round(start_s, 1)
    if deterministic:
        w2 = _guarded(summary, "W2", lambda: w2_latency.measure_engine(llm, runs))
        if w2:
            summary["W2 ms/token"] = round(w2["ms_per_token"], 3)
            summary["_w2"] = w2
    w1 = _guarded(summary, f"W1 ({tag})", lambda: w1_throughput.measure_engine(llm, runs, args.requests))
    if w1:
        w1.update(engine_start_s=start_s, deterministic=deterministic)
        summary[f"W1 out tok/s ({tag})"] = round(w1["output_tokens_per_s"], 1)
        summary[f"_w1_{tag}"] = w1
        w1_throughput.report(w1)
    if deterministic:
        det = _guarded(summary, "determinism", lambda: check_determinism.engine_invariance(llm, 64))
        if det:
            summary["determinism"] = det
    del llm
    harness.free_gpu()


def run_parts(args, parts: set[str]) -> dict:
    path, summary = harness.model_dir(args.model), {}
    if "linear" in parts:
        linear = _guarded(summary, "linear invariance", check_determinism.linear_invariance)
        if linear:
            check_determinism.report({"linear": linear})
            summary["linear rows invariant (ours | cuBLAS)"] = " ".join(
                f"{k}:{int(v['invariant']['rows_invariant'])}|{int(v['cublas']['rows_invariant'])}"
                for k, v in linear.items())
    if "det" in parts:
        engine_workloads(args, path, summary, True, args.runs)
    if "nondet" in parts:
        engine_workloads(args, path, summary, False, max(3, args.runs // 2))
    if "hf" in parts:
        tokenizer = harness.tokenizer_of(path)
        hf2 = _guarded(summary, "HF W2", lambda: w2_latency.measure_hf(path, tokenizer))
        if hf2:
            summary["HF W2 ms/token"] = round(hf2["hf_ms_per_token"], 2)
        hf1 = _guarded(summary, "HF W1", lambda: w1_throughput.measure_hf(path, tokenizer))
        if hf1:
            summary["HF W1 out tok/s (batch 64)"] = round(hf1["hf_output_tokens_per_s"], 1)
    if "w3" in parts:
        from transformers import AutoConfig

        vc = AutoConfig.from_pretrained(path).vision_config
        w3 = _guarded(summary, "W3", lambda: w3_vision.measure(vc, 5, True, path))
        if w3:
            w3_vision.report({"sizes": w3})
            for name, entry in w3.items():
                summary[f"W3 {name} img/s | TFLOP/s (ours)"] = f"{entry['images_per_s']:.1f} | {entry['tflops']:.1f}"
                if "hf_tflops" in entry:
                    summary[f"W3 {name} img/s | TFLOP/s (HF)"] = (f"{entry['hf_images_per_s']:.1f} | "
                                                                 f"{entry['hf_tflops']:.1f}")
    return summary


def summarize() -> None:
    rows, device = [], None
    for path in sorted(harness.RESULTS_DIR.glob("run_all_*.json")):
        if path.exists():
            data = json.loads(path.read_text())
            rows += [(k, v) for k, v in data.items()
                     if not k.startswith("_") and k not in ("device", "date", "torch")]
            device = data.get("device")
    harness.print_table(f"SUMMARY ({device if rows else 'no results'})", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", default="qwen2_5_vl_3b", help="samples/models/real_shape.py name, e.g. qwen3_vl_8b")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--parts", default="linear,det,nondet,hf,w3")
    parser.add_argument("--summarize", action="store_true")
    args = parser.parse_args()
    if args.summarize:
        summarize()
        return
    parts = set(filter(None, args.parts.split(",")))
    summary = run_parts(args, parts)
    public = {k: v for k, v in summary.items() if not k.startswith("_")}
    harness.print_table(f"run_all parts {sorted(parts)}", list(public.items()))
    harness.write_json("run_all_" + "+".join(sorted(parts)), summary)


if __name__ == "__main__":
    main()
