"""Tiny Qwen3-VL at TP=2 (tower replicated, a step's items split across the ranks and their
[tokens, H * (1 + k)] rows - merger + DeepStack - all-gathered) and at PP=2 (tower and both DeepStack
layers on the first stage) against transformers: greedy tokens identical, top-5 logprobs within 1e-4,
with chunked prefill cutting through images and a timestamped video, and a KV cache too small for all
requests (preemption); TP=2 also on the alt shape. Also: a pipeline split that puts a DeepStack layer on a
later stage is refused."""

import numpy as np
import pytest

from conftest import GREEDY, NUM_NEW_TOKENS, TOP_K, assert_matches_reference, parallel_llm
from reference import RefRequest, RefVideo, hf_generate
from test_parallel_vl import IMG, chat, pattern_image

VID = "<|vision_start|><|video_pad|><|vision_end|>"
VIDEO = np.stack([np.asarray(pattern_image(64, 40, 10 + i)) for i in range(4)])
METADATA = {"fps": 4.0, "frames_indices": [0, 2, 4, 6], "total_num_frames": 7, "duration": 1.75,
            "do_sample_frames": False}
CASES = [  # (prompt, images, video or None)
    (chat(f"{IMG}{IMG}Compare them."), [pattern_image(112, 64, 1), pattern_image(64, 96, 2)], None),
    (chat(f"Watch: {VID}What happens?"), [], VIDEO),
    (chat("Answer briefly, please."), [], None),
]


RUNS = [("default", {"tensor_parallel_size": 2}), ("default", {"pipeline_parallel_size": 2}),
        ("alt", {"tensor_parallel_size": 2})]   # alt: 6 query heads over 1 KV head, replicated per rank


def engine_prompts() -> list[dict]:
    prompts = []
    for text, images, video in CASES:
        data = {"image": images} if images else {}
        if video is not None:
            data["video"] = (video, METADATA)
        prompts.append({"prompt": text, "multi_modal_data": data} if data else {"prompt": text})
    return prompts


@pytest.mark.parametrize("shape, parallel", RUNS, ids=["tp2", "pp2", "alt-tp2"])
def test_qwen3_vl_matches_transformers(tiny_model_dir, shape, parallel):
    model_dir = tiny_model_dir("qwen3_vl", shape=shape)
    requests = [RefRequest(prompt=text, images=tuple(images),
                           videos=() if video is None else (RefVideo(video, 4.0, (0, 2, 4, 6)),))
                for text, images, video in CASES]
    references = hf_generate(model_dir, requests, NUM_NEW_TOKENS, top_k=TOP_K, ignore_eos=True)
    longest = max(len(ref.prompt_token_ids) for ref in references) + NUM_NEW_TOKENS
    with parallel_llm(model_dir, max_num_batched_tokens=16, num_gpu_blocks_override=-(-longest // 4) + 3,
                      max_model_len=longest + 4, **parallel) as llm:
        outputs = llm.generate(engine_prompts(), GREEDY, use_tqdm=False)
        stats = llm.client.stats()
    assert_matches_reference(outputs, references)
    assert stats.num_preemptions > 0 and stats.num_free_blocks == stats.num_total_blocks


def test_deepstack_layer_on_a_later_stage_is_refused(tiny_model_dir):
    """The alt shape's 2 decoder layers both take DeepStack features: PP=2 would put layer 1 on stage 1."""
    from transformers import AutoConfig

    from engine.distributed.parallel_context import ParallelContext
    from engine.models.qwen3_vl import Qwen3VLForConditionalGeneration

    config = AutoConfig.from_pretrained(tiny_model_dir("qwen3_vl", shape="alt"))
    with pytest.raises(ValueError, match="DeepStack feeds decoder layers 0..1"):
        Qwen3VLForConditionalGeneration(config, ParallelContext(pp_size=2, pp_rank=1))
