"""Issue 19 acceptance on the CPU in float32: engine.LLM on the tiny Qwen3-VL checkpoints (default and
alt shape) against transformers' Qwen3VLForConditionalGeneration (tests/reference.py): greedy tokens
identical, top-5 logprobs within 1e-4, all requests submitted together (batched with each other).

Cases: text only; one image; three images of odd sizes and modes (P, CMYK, RGBA); text between images;
a video in vLLM's (frames, metadata) form with source frame numbers 0, 4, ..., 16 at 8 fps (five
frames: the last temporal group repeats its frame; timestamps "<0.2 seconds>", "<1.2 seconds>",
"<2.0 seconds>" in the prompt); a video (VideoFrames, 1.5 fps) followed by an image.
Runs: defaults; chunked prefill at 24 tokens per step (chunk boundaries fall inside images and inside
a video's timestamped span, so DeepStack rows must follow the chunk); a KV cache too small for all
(preemption); prefix caching with every prompt twice (hits counted). Every run ends with all KV
blocks free; with defaults every item is encoded in one batched tower call. Also: a bare frame array
without metadata and more images than --limit-mm-per-prompt are refused with clear messages.
"""

import numpy as np
import pytest

from engine import LLM
from reference import RefRequest, RefVideo, hf_generate
from test_shape_variants import odd_mode_images
from test_vl_parity import (BLOCK_SIZE, GREEDY, IMG, LOGPROB_ATOL, MAX_MODEL_LEN, NUM_NEW_TOKENS, TOP_K, VID,
                            assert_matches, chat, pattern_image, pattern_video)
from vision.video import video_from_frames

VIDEO_INDICES = (0, 4, 8, 12, 16)
VIDEO_FPS = 8.0


def make_cases() -> dict:
    """name -> (prompt, images, videos as (engine form, RefVideo))."""
    video = pattern_video(len(VIDEO_INDICES), 60, 44, seed=50)
    metadata = {"fps": VIDEO_FPS, "frames_indices": list(VIDEO_INDICES), "total_num_frames": 17,
                "duration": 17 / VIDEO_FPS, "do_sample_frames": False}
    other = pattern_video(6, 42, 42, seed=30)
    palette, _, cmyk, rgba = odd_mode_images()
    return {
        "text_only": (chat("Please answer the question briefly."), [], []),
        "one_image": (chat(f"{IMG}Describe this image."), [pattern_image(112, 84, 1)], []),
        "three_images_odd": (chat(f"{IMG}{IMG}{IMG}Compare them."), [palette, cmyk, rgba], []),
        "text_between_images": (chat(f"{IMG}The cat sat on the mat.{IMG}Which one is brighter?"),
                                [pattern_image(70, 100, 5), pattern_image(130, 56, 6)], []),
        "video_metadata": (chat(f"{VID}What is in the video?"), [],
                           [((video, metadata), RefVideo(video, VIDEO_FPS, VIDEO_INDICES))]),
        "video_then_image": (chat(f"{VID}Now this picture: {IMG}Describe both."), [pattern_image(98, 70, 8)],
                             [(video_from_frames(other, 1.5), RefVideo(other, 1.5))]),
    }


def engine_prompt(case) -> dict:
    text, images, videos = case
    data = {"image": images} if images else {}
    if videos:
        data["video"] = [engine_form for engine_form, _ in videos]
    return {"prompt": text, "multi_modal_data": data} if data else {"prompt": text}


def ref_request(case) -> RefRequest:
    text, images, videos = case
    return RefRequest(prompt=text, images=tuple(images), videos=tuple(ref for _, ref in videos))


@pytest.fixture(scope="module", params=["default", "alt"])
def model(request, tiny_model_dir):
    model_dir = str(tiny_model_dir("qwen3_vl", shape=request.param))
    cases = make_cases()
    refs = hf_generate(model_dir, [ref_request(c) for c in cases.values()], NUM_NEW_TOKENS, top_k=TOP_K,
                       ignore_eos=True)
    return model_dir, cases, dict(zip(cases, refs))


def run(model, copies: int = 1, **kwargs):
    model_dir, cases, reference = model
    kwargs = {"enable_prefix_caching": False, "num_gpu_blocks_override": 400, **kwargs}
    llm = LLM(model_dir, dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE, **kwargs)
    names = list(cases) * copies
    outputs = llm.generate([engine_prompt(cases[name]) for name in names], GREEDY, use_tqdm=False)
    max_error = max(assert_matches(output, reference[name]) for output, name in zip(outputs, names))
    stats = llm.client.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert max_error <= LOGPROB_ATOL
    return llm, outputs, stats


def test_timestamps_are_in_the_prompt(model):
    model_dir, cases, reference = model
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(model_dir).decode(reference["video_metadata"].prompt_token_ids)
    # groups (0, 4), (8, 12), (16, 16) at 8 fps: means 0.25, 1.25, 2.0 s, formatted with one decimal
    assert "<0.2 seconds><|vision_start|>" in text and "<1.2 seconds>" in text and "<2.0 seconds>" in text


def test_defaults_batched(model):
    llm, _, _ = run(model)
    _, cases, _ = model
    encoder = llm.client.core.runner.encoder_runner
    num_items = sum(len(images) + len(videos) for _, images, videos in cases.values())
    assert (encoder.num_tower_calls, encoder.num_encoded_items) == (1, num_items)  # one batched tower call


def test_chunked_prefill_cuts_through_images_and_video(model):
    run(model, max_num_batched_tokens=24)


def test_scarce_kv_cache_preempts(model):
    _, _, reference = model
    longest = max(len(ref.prompt_token_ids) for ref in reference.values()) + NUM_NEW_TOKENS
    _, _, stats = run(model, num_gpu_blocks_override=-(-longest // BLOCK_SIZE) + 2)
    assert stats.num_preemptions > 0


def test_prefix_caching_every_prompt_twice(model):
    _, outputs, stats = run(model, copies=2, enable_prefix_caching=True)
    twins = outputs[len(outputs) // 2:]
    for twin in twins:
        assert twin.num_cached_tokens == (len(twin.prompt_token_ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert stats.prefix_cache_hits >= sum(twin.num_cached_tokens for twin in twins) > 0


def test_bare_video_array_and_too_many_images_are_refused(model):
    model_dir, cases, _ = model
    llm = LLM(model_dir, dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=50,
              limit_mm_per_prompt={"image": 2, "video": 1})
    text, images, _ = cases["three_images_odd"]
    with pytest.raises(ValueError, match="At most 2 image"):
        llm.generate({"prompt": text, "multi_modal_data": {"image": images}}, GREEDY, use_tqdm=False)
    frames = pattern_video(4, 56, 40, seed=20)
    with pytest.raises(ValueError, match="Qwen3-VL needs video metadata"):
        llm.generate({"prompt": chat(f"{VID}What?"), "multi_modal_data": {"video": frames}}, GREEDY, use_tqdm=False)
    stats = llm.client.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_chat_with_a_file_video_samples_and_times_like_transformers(model, media_dir):
    """LLM.chat fetches and decodes the video itself; transformers decodes it with its PyAV reader and
    samples it with Qwen3VLVideoProcessor.sample_frames (the container's fps and frame count)."""
    from transformers import AutoProcessor
    from transformers.video_utils import load_video

    model_dir, _, _ = model
    path = media_dir / "lossless.mov"
    llm = LLM(model_dir, dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=100,
              allowed_local_media_path=str(media_dir))
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{path}"}},
                                             {"type": "text", "text": "What happens?"}]}]
    [output] = llm.chat(messages, GREEDY, use_tqdm=False)
    sampler = AutoProcessor.from_pretrained(model_dir).video_processor.sample_frames
    frames, metadata = load_video(str(path), backend="pyav", sample_indices_fn=sampler)
    video = RefVideo(frames, metadata.fps, tuple(int(i) for i in metadata.frames_indices))
    [ref] = hf_generate(model_dir, [[{"role": "user", "content": [{"type": "video", "video": video},
                                                                  {"type": "text", "text": "What happens?"}]}]],
                        NUM_NEW_TOKENS, top_k=TOP_K, ignore_eos=True)
    assert_matches(output, ref)
