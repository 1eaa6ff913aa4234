"""Issue 9 acceptance: engine.LLM on the tiny InternVL checkpoints against transformers'
InternVLForConditionalGeneration (tests/reference.py), float32 on the CPU.

Five prompts (one tile-sized image; a wide image that tiles into several tiles + a thumbnail; two
images; a 4-frame video; text only) submitted together: greedy tokens identical, top-5 logprobs
within 1e-4, with defaults and with chunked prefill cutting through the placeholders. The same
weights in the original OpenGVLab layout (loaded with trust_remote_code, prompts using the
InternVL2.5 `<image>` placeholder text) give the same greedy tokens and logprobs within 1e-4 of
transformers' model run on pixels preprocessed OpenGVLab's way (PIL); without the flag, the error
says to add it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from reference import RefRequest, RefVideo, hf_generate, load
from tests.parity.test_vl_parity import pattern_image, pattern_video
from tests.vision.test_internvl_processor import _opengvlab_load_image

NUM_NEW_TOKENS = 8
TOP_K = 5
LOGPROB_ATOL = 1e-4
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=TOP_K)
TILE = 56  # the tiny checkpoint's image_size (448 in InternVL2.5)


def chat(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def cases():
    """name -> (content with {img}/{vid} slots, images, videos as frames), media in prompt order."""
    return {
        "single_tile_image": ("{img}\nDescribe this image.", [pattern_image(TILE, TILE, 1)], []),
        "wide_image_tiles": ("{img}\nWhat is in it?", [pattern_image(230, 60, 2)], []),  # 4x1 + thumbnail
        "two_images": ("{img}\nThe cat sat on the mat.{img}\nCompare them.",
                       [pattern_image(100, 70, 3), pattern_image(60, 150, 4)], []),
        "video_4_frames": ("{vid}\nWhat is in the video?", [], [pattern_video(4, 70, 40, seed=20)]),
        "text_only": ("Please answer the question briefly.", [], []),
    }


def prompt(case, image_slot: str) -> str:
    return chat(case[0].format(img=image_slot, vid="<video>"))


def engine_prompt(case, image_slot: str) -> dict:
    _, images, videos = case
    data = {k: v for k, v in (("image", images), ("video", videos)) if v}
    return {"prompt": prompt(case, image_slot), **({"multi_modal_data": data} if data else {})}


@pytest.fixture(scope="module")
def hf_dir(tiny_model_dir):
    return str(tiny_model_dir("internvl"))


@pytest.fixture(scope="module")
def reference(hf_dir, cases):
    requests = [RefRequest(prompt=prompt(case, "<IMG_CONTEXT>"), images=tuple(case[1]),
                           videos=tuple(RefVideo(frames, 2.0) for frames in case[2])) for case in cases.values()]
    return dict(zip(cases, hf_generate(hf_dir, requests, NUM_NEW_TOKENS, top_k=TOP_K, ignore_eos=True)))


def make_llm(model_dir, **kwargs) -> LLM:
    kwargs = {"enable_prefix_caching": False, "num_gpu_blocks_override": 200, **kwargs}
    return LLM(model_dir, dtype="float32", device="cpu", max_model_len=1024, block_size=16, **kwargs)


def max_logprob_error(output, ref) -> float:
    completion = output.outputs[0]
    assert completion.token_ids == ref.token_ids
    return max(abs(ours[token_id].logprob - logprob)
               for ours, theirs in zip(completion.logprobs, ref.top_logprobs, strict=True)
               for token_id, logprob in theirs.items())


@pytest.mark.parametrize("max_num_batched_tokens", [None, 16])
def test_hf_layout_matches_transformers(hf_dir, cases, reference, max_num_batched_tokens):
    llm = make_llm(hf_dir, **({"max_num_batched_tokens": max_num_batched_tokens} if max_num_batched_tokens else {}))
    outputs = llm.generate([engine_prompt(case, "<IMG_CONTEXT>") for case in cases.values()], GREEDY, use_tqdm=False)
    errors = {}
    for output, name in zip(outputs, cases):
        assert output.prompt_token_ids == reference[name].prompt_token_ids, name
        errors[name] = max_logprob_error(output, reference[name])
    assert max(errors.values()) <= LOGPROB_ATOL, errors
    wide = outputs[list(cases).index("wide_image_tiles")].prompt_token_ids
    assert wide.count(llm.config.model_config.hf_config.image_token_id) == 5 * 4  # 4 tiles + thumbnail
    print(f"internvl (chunk {max_num_batched_tokens}): max |logprob error| {max(errors.values()):.2e}")


@torch.inference_mode()
def _hf_on_opengvlab_pixels(hf_dir, prompt_ids: list[int], case) -> list[dict[int, float]]:
    """transformers' model, greedy, on our prompt ids and OpenGVLab-preprocessed pixels."""
    model = load(hf_dir).model
    _, images, videos = case
    tiles = [_opengvlab_load_image(image, input_size=TILE, max_num=6) for image in images]
    tiles += [torch.cat([_opengvlab_load_image(frame_image(f), input_size=TILE, max_num=1) for f in v])
              for v in videos]
    order = _media_order(case)
    media = {"pixel_values": torch.cat([tiles[i] for i in order])} if tiles else {}
    out = model.generate(input_ids=torch.tensor([prompt_ids]), **media,
                         max_new_tokens=NUM_NEW_TOKENS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    logprobs = [torch.log_softmax(step[0], -1) for step in out.logits]
    return out.sequences[0, len(prompt_ids):].tolist(), [dict(zip(*[t.tolist() for t in lp.topk(TOP_K)][::-1]))
                                                          for lp in logprobs]


def frame_image(frame: np.ndarray):
    from PIL import Image

    return Image.fromarray(frame)


def _media_order(case) -> list[int]:
    """Indices into images + videos in prompt order (images first in the list, videos after)."""
    content, images, _ = case
    order, next_image, next_video = [], 0, len(images)
    for piece in content.split("{")[1:]:
        if piece.startswith("img}"):
            order.append(next_image)
            next_image += 1
        elif piece.startswith("vid}"):
            order.append(next_video)
            next_video += 1
    return order


def test_original_layout_without_trust_remote_code(hf_dir, tiny_model_dir, cases, reference):
    original_dir = str(tiny_model_dir("internvl_chat"))
    llm = make_llm(original_dir)  # no remote code runs, so vLLM's seed command needs no flag
    outputs = llm.generate([engine_prompt(case, "<image>") for case in cases.values()], GREEDY, use_tqdm=False)
    worst = 0.0
    for output, (name, case) in zip(outputs, cases.items()):
        assert output.prompt_token_ids == reference[name].prompt_token_ids, name
        assert output.outputs[0].token_ids == reference[name].token_ids, name
        tokens, top = _hf_on_opengvlab_pixels(hf_dir, output.prompt_token_ids, case)
        assert tokens == output.outputs[0].token_ids, name
        for ours, theirs in zip(output.outputs[0].logprobs, top, strict=True):
            worst = max(worst, max(abs(ours[t].logprob - lp) for t, lp in theirs.items()))
    assert worst <= LOGPROB_ATOL
    print(f"internvl_chat (original layout, PIL preprocessing): max |logprob error| {worst:.2e}")
