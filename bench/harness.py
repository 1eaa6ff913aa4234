"""Shared plumbing of the bench/ scripts: real-shape model directories, the engine under test,
the HF transformers baseline at the same shape, prompts with fresh images, stage timers, and
result output (a printed table + JSON under bench/results/).

Caller: bench/w1_throughput.py, w2_latency.py, w3_vision.py, w4_serving.py, check_determinism.py
and run_all.py. Not imported by the engine.
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "samples" / "models"))

IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>"
WORDS = ("the quick brown fox jumps over lazy dogs while seven wizards quietly judge boxing matches "
         "near old castles under bright stars and every river runs toward distant blue mountains").split()


def model_dir(name: str = "qwen2_5_vl_3b") -> str:
    from real_shape import write_real_shape_dir

    return str(write_real_shape_dir(name, Path("/tmp/vlserve_bench") / name))


def make_llm(path: str, **kwargs):
    """The engine under test with dummy (random) weights; -> (llm, start seconds)."""
    from engine.llm import LLM

    start = time.perf_counter()
    llm = LLM(model=path, load_format="dummy", dtype="bfloat16", **kwargs)
    torch.cuda.synchronize()
    return llm, time.perf_counter() - start


def tokenizer_of(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def text_of_tokens(tokenizer, num_tokens: int, seed: int) -> str:
    """Random words until the tokenizer counts about num_tokens tokens."""
    rng, words = random.Random(seed), []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < num_tokens:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def fresh_images(count: int, size: tuple[int, int], seed: int):
    """count RGB PIL images of random pixels (width, height); a new seed gives new images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def hf_model(path: str):
    """transformers' model at the same real shape, random weights made on the GPU, bf16, sdpa."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    arch = getattr(transformers, config.architectures[0])
    with torch.device("cuda"):
        model = arch._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model.eval()


class StageTimers:
    """Cheap opt-in timers: `wrap(obj, method, stage)` replaces a method by one that synchronizes
    the GPU and adds its wall time to `stage`. Used only in an extra instrumented run, never in
    the timed runs (the synchronisation costs overlap)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list = []

    def wrap(self, obj, method: str, stage: str, classify=None) -> None:
        original = getattr(obj, method)

        def timed(*args, **kwargs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = original(*args, **kwargs)
            torch.cuda.synchronize()
            name = classify(*args, **kwargs) if classify else stage
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            return result

        own = method in getattr(obj, "__dict__", {})
        setattr(obj, method, timed)
        self._undo.append((obj, method, original, own))

    def restore(self) -> None:
        for obj, method, original, own in reversed(self._undo):
            if own:
                setattr(obj, method, original)
            else:   # drop the instance attribute: a stored bound method would be a reference cycle
                delattr(obj, method)
        self._undo = []


def free_gpu() -> None:
    """After `del llm`: collect reference cycles so the engine's KV cache and graphs go back."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()


@contextlib.contextmanager
def cuda_timer(out: list):
    torch.cuda.synchronize()
    start = time.perf_counter()
    yield
    torch.cuda.synchronize()
    out.append(time.perf_counter() - start)


def median(values):
    return statistics.median(values) if values else float("nan")


def print_table(title: str, rows: list[tuple[str, object]]) -> None:
    print(f"\n== {title}")
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        text = f"{value:,.2f}" if isinstance(value, float) else str(value)
        print(f"  {key.ljust(width)}  {text}")


def write_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = dict(payload, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   date=time.strftime("%Y-%m-%d %H:%M:%S"), torch=torch.__version__)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
