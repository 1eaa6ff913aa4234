"""Tiny Qwen2.5-VL at TP=2 (tower replicated, a step's images split across the ranks and
all-gathered) and at PP=2 (tower on the first stage) against transformers: greedy tokens
identical, top-5 logprobs within 1e-4, with chunked prefill cutting through placeholders and a KV
cache too small for all requests (preemption)."""

import numpy as np
import pytest
from PIL import Image

from conftest import GREEDY, NUM_NEW_TOKENS, TOP_K, assert_matches_reference, parallel_llm
from reference import RefRequest, hf_generate

IMG = "<|vision_start|><|image_pad|><|vision_end|>"


def chat(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def pattern_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 // (width - 1), ys * 255 // (height - 1), (xs + ys) * 255 // (width + height - 2)], -1)
    return Image.fromarray(np.clip(base + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8))


CASES = [
    (chat(f"{IMG}{IMG}{IMG}Compare them."), [pattern_image(112, 56, 1), pattern_image(56, 84, 2), pattern_image(84, 84, 3)]),
    (chat(f"Look: {IMG}What is it?"), [pattern_image(140, 56, 4)]),
    (chat("Answer briefly, please."), []),
]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen2_5_vl")


@pytest.fixture(scope="module")
def references(model_dir):
    requests = [RefRequest(prompt=text, images=tuple(images)) for text, images in CASES]
    return hf_generate(model_dir, requests, NUM_NEW_TOKENS, top_k=TOP_K, ignore_eos=True)


@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}],
                         ids=["tp2", "pp2"])
def test_vl_matches_transformers(model_dir, references, parallel):
    prompts = [{"prompt": text, "multi_modal_data": {"image": images}} if images else {"prompt": text}
               for text, images in CASES]
    with parallel_llm(model_dir, max_num_batched_tokens=24, num_gpu_blocks_override=14, max_model_len=52,
                      **parallel) as llm:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        stats = llm.client.stats()
    assert_matches_reference(outputs, references)
    assert stats.num_preemptions > 0 and stats.num_free_blocks == stats.num_total_blocks
