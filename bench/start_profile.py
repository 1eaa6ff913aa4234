"""Where engine start-up goes (issue 14: start <= 15 s): starts the 3B-shape engine with dummy weights
(--max-model-len 8000, gpu_memory_utilization 0.9, defaults otherwise) and prints the start time and its
phases from the engine's log lines, plus how many Triton kernels were compiled and the seconds spent in
Triton's compile (wrapped). Run under `py-spy record` for the full picture.

    python bench/start_profile.py [--model qwen2_5_vl_3b] [--no-deterministic]
Caller: by hand, bench/gpu_acceptance.sh (part start).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import harness  # noqa: E402
import triton  # noqa: E402
import triton.compiler  # noqa: E402
import triton.compiler.compiler as triton_compiler  # noqa: E402

COMPILES: list[tuple[str, float]] = []


def count_compiles() -> None:
    original = triton_compiler.compile

    def timed_compile(src, *args, **kwargs):
        start = time.perf_counter()
        result = original(src, *args, **kwargs)
        name = getattr(getattr(src, "fn", None), "__name__", str(src)[:40])
        COMPILES.append((name, time.perf_counter() - start))
        return result

    triton_compiler.compile = timed_compile
    triton.compiler.compile = timed_compile   # what JITFunction.create_binder imports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2_5_vl_3b")
    parser.add_argument("--no-deterministic", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(name)s: %(message)s")
    count_compiles()
    llm, seconds = harness.make_llm(harness.model_dir(args.model), max_model_len=8000,
                                    gpu_memory_utilization=0.9, deterministic=not args.no_deterministic)
    by_kernel: dict[str, list[float]] = {}
    for name, s in COMPILES:
        by_kernel.setdefault(name, []).append(s)
    print(f"engine start {seconds:.1f} s; Triton compiles {len(COMPILES)} taking {sum(s for _, s in COMPILES):.1f} s")
    for name, times in sorted(by_kernel.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {name:32s} {len(times):3d} compiles {sum(times):6.2f} s")
    del llm


if __name__ == "__main__":
    main()
