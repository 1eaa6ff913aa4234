"""Nothing may depend on the shapes of our default tiny checkpoints: the same parity bar (greedy tokens
identical to transformers', top-5 logprobs within 1e-4, float32 on the CPU) on the `alt` shape of
samples/models/build_tiny.py - 6 query heads sharing 1 KV head, hidden 96, M-RoPE sections [2, 2, 4],
another rope theta, a larger odd vocab, the other tying, vision towers with 3 heads, other depths and
full-attention blocks [0, 3] - with images in other modes (P, LA, CMYK, RGBA) and sizes, under defaults,
chunked prefill (24 tokens per step) and a KV cache small enough to preempt.
"""

import json

import numpy as np
import pytest
from PIL import Image

from engine import LLM
from reference import hf_generate
from test_vl_parity import (GREEDY, IMG, LOGPROB_ATOL, MAX_MODEL_LEN, NUM_NEW_TOKENS, TOP_K, assert_matches,
                            chat, engine_prompt, make_cases, pattern_image, ref_request)

RUNS = [("defaults", {}), ("chunked 24", {"max_num_batched_tokens": 24}), ("scarce KV", {"scarce": True})]


def odd_mode_images() -> list[Image.Image]:
    """Modes that the processors must convert to RGB the way transformers does, at sizes that resize.
    (16-bit modes are left out on purpose: transformers clips them to white, we scale them - the
    documented difference in vision/image.py, tested in tests/vision.)"""
    palette = pattern_image(150, 97, 41).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    gray_alpha = pattern_image(61, 203, 42).convert("LA")
    cmyk = pattern_image(117, 117, 43).convert("CMYK")
    rgba = pattern_image(88, 140, 44).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(88, dtype=np.uint8) * 2, (140, 1))))
    return [palette, gray_alpha, cmyk, rgba]


def make_alt_cases() -> dict:
    cases = {name: case for name, case in make_cases().items()
             if name in ("one_image", "three_images", "video_then_image", "text_only")}
    images = odd_mode_images()
    cases["odd_modes"] = (chat(f"{IMG}{IMG} and {IMG}{IMG}: what differs?"), images, [])
    return cases


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def alt_model(request, tiny_model_dir):
    model_dir = str(tiny_model_dir(request.param, shape="alt"))
    cases = make_alt_cases()
    refs = hf_generate(model_dir, [ref_request(c) for c in cases.values()], NUM_NEW_TOKENS, top_k=TOP_K,
                       ignore_eos=True)
    return model_dir, cases, dict(zip(cases, refs))


@pytest.mark.parametrize("label, kwargs", RUNS, ids=[label for label, _ in RUNS])
def test_alt_shape_vl_matches_transformers(alt_model, label, kwargs):
    model_dir, cases, reference = alt_model
    kwargs, num_blocks = dict(kwargs), 400   # a copy: RUNS is shared by both models
    if kwargs.pop("scarce", False):  # the longest request alone fits, all of them do not
        longest = max(len(ref.prompt_token_ids) for ref in reference.values()) + NUM_NEW_TOKENS
        num_blocks = -(-longest // 16) + 2
    llm = LLM(model_dir, dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, block_size=16,
              num_gpu_blocks_override=num_blocks, enable_prefix_caching=False, **kwargs)
    outputs = llm.generate([engine_prompt(case) for case in cases.values()], GREEDY, use_tqdm=False)
    max_error = max(assert_matches(output, reference[name]) for output, name in zip(outputs, cases))
    stats = llm.client.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    if num_blocks < 400:
        assert stats.num_preemptions > 0
    assert max_error <= LOGPROB_ATOL
    print(f"{label}: max |logprob error| {max_error:.2e}")


def test_alt_shape_text_matches_transformers(tiny_model_dir):
    model_dir = str(tiny_model_dir("qwen2", shape="alt"))
    vocab = json.loads(open(f"{model_dir}/config.json").read())["vocab_size"]
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, vocab, size=n).tolist() for n in (3, 17, 40, 133)]
    refs = hf_generate(model_dir, prompts, NUM_NEW_TOKENS, top_k=TOP_K, ignore_eos=True)
    llm = LLM(model_dir, dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN,
              num_gpu_blocks_override=200, max_num_batched_tokens=48)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], GREEDY, use_tqdm=False)
    for output, ref in zip(outputs, refs):
        assert_matches(output, ref)
