"""GPU check of tensor / pipeline parallelism (issue 10; the multi-GPU run is issue 11): the tiny
Qwen2 and Qwen2.5-VL checkpoints in float32 on CUDA at TP=1, TP=2, PP=2 and TP=2 x PP=2 (as many
as the visible GPUs allow), each through --distributed-executor-backend mp (and ray with --ray),
against TP=1: greedy tokens identical and the largest top-5 logprob difference, plus wall time per
run. Exits 1 on a token mismatch or an error above --atol.

    python bench/check_parallel.py [--atol 1e-3] [--ray]
Caller: by hand, on a machine with 2 or 4 GPUs (not part of the CPU test suite).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
IMG = "<|vision_start|><|image_pad|><|vision_end|>"


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prompts(name: str) -> list:
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    if name == "qwen2":
        return [{"prompt_token_ids": list(range(10 + i, 10 + i + 20 * (i + 1)))} for i in range(8)]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (56 * (i + 1), 84, 3), dtype=np.uint8)) for i in range(4)]
    return [{"prompt": chat.format(f"{IMG}{IMG}Compare."), "multi_modal_data": {"image": images[:2]}},
            {"prompt": chat.format(f"{IMG}Describe."), "multi_modal_data": {"image": images[2:3]}},
            {"prompt": chat.format("Just text.")}]


def run(model_dir: Path, name: str, **parallel):
    from engine import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=5)
    started = time.perf_counter()
    llm = LLM(str(model_dir), dtype="float32", device="cuda", max_model_len=1024, max_num_batched_tokens=64,
              enable_prefix_caching=False, **parallel)
    try:
        loaded = time.perf_counter()
        outputs = llm.generate(prompts(name), params, use_tqdm=False)
        return outputs, loaded - started, time.perf_counter() - loaded
    finally:
        llm.client.core.shutdown()


def compare(base, other) -> tuple[bool, float]:
    same, worst = True, 0.0
    for a, b in zip(base, other):
        ca, cb = a.outputs[0], b.outputs[0]
        same &= ca.token_ids == cb.token_ids
        for la, lb in zip(ca.logprobs, cb.logprobs):
            worst = max([worst] + [abs(la[t].logprob - lb[t].logprob) for t in la if t in lb])
    return same, worst


def main() -> int:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--atol", type=float, default=1e-3)
    parser.add_argument("--ray", action="store_true")
    args = parser.parse_args()
    num_gpus = torch.cuda.device_count()
    layouts = [(2, 1), (1, 2), (2, 2)]
    backends = ["mp"] + (["ray"] if args.ray else [])
    builder = load_module(REPO / "samples" / "models" / "build_tiny.py")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("qwen2", "qwen2_5_vl"):
            model_dir = Path(tmp) / name
            builder.build(name, model_dir)
            base, load_s, run_s = run(model_dir, name)
            print(f"{name} tp1: load {load_s:.1f}s, generate {run_s:.2f}s")
            for (tp, pp) in layouts:
                if tp * pp > num_gpus:
                    continue
                for backend in backends:
                    outputs, load_s, run_s = run(model_dir, name, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                                 distributed_executor_backend=backend)
                    same, worst = compare(base, outputs)
                    ok &= same and worst <= args.atol
                    print(f"{name} tp{tp} pp{pp} {backend}: tokens {'same' if same else 'DIFFER'}, "
                          f"max logprob diff {worst:.2e}, load {load_s:.1f}s, generate {run_s:.2f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
