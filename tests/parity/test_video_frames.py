"""Videos given offline as frames, on the tiny Qwen2.5-VL (the one model whose positions depend on
time), float32 CPU. Oracle: transformers' Qwen2.5-VL processor and model.

A bare 4-frame array carries no metadata: transformers takes it as 24 frames per second
(`VideoMetadata.sampled_fps`), so second_per_grid_t = 2/24; tokens and top-5 logprobs must equal
transformers' on the same bare array. vLLM's `(frames, metadata)` tuple gives the source fps,
frames_indices and total_num_frames; the sampled rate must be transformers' for the same metadata.
"""

import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.frontend import as_video_frames
from reference import RefRequest, RefVideo, hf_generate, load, prepare_inputs
from tests.parity.test_vl_parity import VID, assert_matches, chat, pattern_video

NUM_NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=5)
FRAMES = pattern_video(4, 56, 40, seed=20)
PROMPT = chat(f"{VID}What is in the video?")
METADATA = {"fps": 30.0, "frames_indices": [0, 15, 30, 45], "total_num_frames": 60, "duration": 2.0}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("qwen2_5_vl"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32", device="cpu", max_model_len=1024, num_gpu_blocks_override=128,
               enable_prefix_caching=False)


def hf_second_per_grid(model_dir, metadata: dict | None) -> float:
    processor = load(model_dir).processor
    extra = {} if metadata is None else {"video_metadata": [metadata]}
    out = processor(text=[PROMPT], videos=[FRAMES], do_sample_frames=False, return_tensors="pt", **extra)
    return float(out["second_per_grid_ts"][0])


def test_bare_frame_array_equals_transformers(llm, model_dir):
    [reference] = hf_generate(model_dir, [RefRequest(prompt=PROMPT, videos=(RefVideo(FRAMES, None),))],
                              NUM_NEW_TOKENS, top_k=5, ignore_eos=True)
    [output] = llm.generate({"prompt": PROMPT, "multi_modal_data": {"video": FRAMES}}, GREEDY, use_tqdm=False)
    assert_matches(output, reference)
    temporal_patch = load(model_dir).processor.video_processor.temporal_patch_size
    assert temporal_patch / as_video_frames(FRAMES).fps == pytest.approx(hf_second_per_grid(model_dir, None)) == 2 / 24
    # The convention matters: at the 2 fps qwen-vl-utils samples with, transformers' tokens differ.
    [at_2_fps] = hf_generate(model_dir, [RefRequest(prompt=PROMPT, videos=(RefVideo(FRAMES, 2.0),))],
                             NUM_NEW_TOKENS, top_k=5, ignore_eos=True)
    assert at_2_fps.top_logprobs != reference.top_logprobs


def test_frames_with_metadata_follow_transformers(llm, model_dir):
    video = as_video_frames((FRAMES, METADATA))
    temporal_patch = load(model_dir).processor.video_processor.temporal_patch_size
    assert video.fps == 2.0 and temporal_patch / video.fps == pytest.approx(hf_second_per_grid(model_dir, METADATA))
    assert video.frame_indices == (0, 15, 30, 45) and video.total_frames == 60 and video.video_fps == 30.0
    assert as_video_frames((FRAMES, {"fps": 6.0})).fps == 6.0  # no indices: the fps is the sampled rate
    [reference] = hf_generate(model_dir, [RefRequest(prompt=PROMPT, videos=(RefVideo(FRAMES, 2.0),))],
                              NUM_NEW_TOKENS, top_k=5, ignore_eos=True)
    for data in ((FRAMES, METADATA), [(FRAMES, METADATA)]):
        [output] = llm.generate({"prompt": PROMPT, "multi_modal_data": {"video": data}}, GREEDY, use_tqdm=False)
        assert_matches(output, reference)


@pytest.mark.parametrize("metadata, message", [
    ({"fps": -1}, "fps"), ({"fps": 30, "total_num_frames": 0}, "total_num_frames"),
    ({"fps": 30, "frames_indices": [0, 1], "total_num_frames": 60}, "frames_indices"),
    ({"fps": 30, "frames_indices": [0, 1, 2, 99], "total_num_frames": 60}, "frames_indices"),
])
def test_bad_metadata_is_refused(metadata, message):
    with pytest.raises(ValueError, match=message):
        as_video_frames((np.zeros((4, 8, 8, 3), np.uint8), metadata))
