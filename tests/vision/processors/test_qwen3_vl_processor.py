"""Qwen3-VL processor vs transformers 5.23's Qwen3VLProcessor (Qwen2VLImageProcessor + Qwen3VLVideoProcessor)
loaded from the tiny checkpoint: pixel values, grids and the expanded prompt ids (timestamps included)
for images, already-sampled videos with source frame numbers, vLLM's (frames, metadata) with
do_sample_frames, and video files decoded and sampled from their container; token counts from sizes.
"""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

from vision.inputs import PlaceholderRange
from vision.processors import get_processor
from vision.video import decode_video, video_from_frames, video_from_metadata

VISION = "<|vision_start|>{}<|vision_end|>"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3_vl")


@pytest.fixture(scope="module")
def ours(model_dir):
    return get_processor(str(model_dir), AutoConfig.from_pretrained(model_dir))


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoProcessor.from_pretrained(model_dir)


def _pixel_values(processor, media):
    item = media.to_item(PlaceholderRange(0, media.num_tokens))
    return processor.pixel_values_from_frames(torch.from_numpy(media.frames), item, torch.float32)


def _hf_call(hf, text, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf(text=[text], return_tensors="pt", **kwargs)


def _hf_metadata(metadata: dict) -> dict:
    """transformers' VideoMetadata has no do_sample_frames (vLLM passes it as a processor kwarg)."""
    return {k: v for k, v in metadata.items() if k != "do_sample_frames"}


def _expand(ours, hf, text, media):
    return ours.expand_placeholders(hf.tokenizer.encode(text), media)[0]


@pytest.mark.parametrize("height,width", [(20, 20), (84, 112), (97, 150), (700, 1000), (30, 400)])
def test_images_match_transformers(model_dir, ours, height, width):
    image = Image.fromarray(np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8))
    expected = AutoImageProcessor.from_pretrained(model_dir)(images=[image], return_tensors="pt")
    media = ours.process_image(image)
    assert media.grid_thw == tuple(expected["image_grid_thw"][0].tolist())
    torch.testing.assert_close(_pixel_values(ours, media), expected["pixel_values"], rtol=0, atol=1e-6)
    assert ours.num_tokens_for_size("image", height, width) == media.num_tokens


@pytest.mark.parametrize("indices,fps,size", [((0, 1, 2, 3), 2.0, (40, 56)), ((0, 4, 8, 12, 16), 8.0, (44, 60)),
                                              ((3, 9, 15, 21, 27, 33), 29.97, (300, 500)), ((0, 5), 1.0, (20, 90))])
def test_sampled_videos_with_metadata_match_transformers(ours, hf, indices, fps, size):
    frames = np.random.default_rng(len(indices)).integers(0, 256, (len(indices), *size, 3), dtype=np.uint8)
    metadata = {"fps": fps, "frames_indices": list(indices), "total_num_frames": indices[-1] + 1,
                "duration": (indices[-1] + 1) / fps, "do_sample_frames": False}
    text = "a " + VISION.format("<|video_pad|>") + " b"
    expected = _hf_call(hf, text, videos=[frames], video_metadata=[_hf_metadata(metadata)], do_sample_frames=False)
    video = video_from_metadata(frames, metadata)
    media = ours.process_video(video.frames, video.fps, metadata=video)
    assert media.grid_thw == tuple(expected["video_grid_thw"][0].tolist())
    torch.testing.assert_close(_pixel_values(ours, media), expected["pixel_values_videos"], rtol=0, atol=1e-6)
    assert _expand(ours, hf, text, [media]) == expected["input_ids"][0].tolist()
    pads = int((expected["input_ids"] == hf.video_token_id).sum())
    assert ours.num_tokens_for_size("video", *size, num_frames=len(indices)) == pads


def test_do_sample_frames_samples_like_transformers(ours, hf):
    frames = np.random.default_rng(7).integers(0, 256, (45, 48, 64, 3), dtype=np.uint8)
    metadata = {"fps": 15.0, "total_num_frames": 45, "duration": 3.0, "do_sample_frames": True}
    text = VISION.format("<|video_pad|>")
    for mm_kwargs, hf_kwargs in ((None, {}), ({"fps": 4}, {"fps": 4}), ({"num_frames": 5}, {"num_frames": 5, "fps": None})):
        expected = _hf_call(hf, text, videos=[frames], video_metadata=[_hf_metadata(metadata)], do_sample_frames=True,
                            **hf_kwargs)
        video = video_from_metadata(frames, metadata, ours.video_sampling_kwargs(mm_kwargs))
        media = ours.process_video(video.frames, video.fps, mm_kwargs, metadata=video)
        assert media.grid_thw == tuple(expected["video_grid_thw"][0].tolist()), mm_kwargs
        torch.testing.assert_close(_pixel_values(ours, media), expected["pixel_values_videos"], rtol=0, atol=1e-6)
        assert _expand(ours, hf, text, [media]) == expected["input_ids"][0].tolist(), mm_kwargs


@pytest.mark.parametrize("name", ["lossless.mov", "h264.mp4"])
def test_video_files_sample_and_time_like_transformers(ours, hf, media_dir, name):
    """transformers decodes the file (its PyAV reader) and samples from the container's fps and frame count."""
    from transformers.video_utils import load_video

    text = VISION.format("<|video_pad|>")
    frames, metadata = load_video(str(media_dir / name), backend="pyav", sample_indices_fn=hf.video_processor.sample_frames)
    expected = _hf_call(hf, text, videos=[frames], video_metadata=[metadata], do_sample_frames=False)
    video = decode_video((media_dir / name).read_bytes(), **ours.video_sampling_kwargs(None))
    media = ours.process_video(video.frames, video.fps, metadata=video)
    assert _expand(ours, hf, text, [media]) == expected["input_ids"][0].tolist()
    assert media.grid_thw == tuple(expected["video_grid_thw"][0].tolist())
    atol = 1e-6 if name == "lossless.mov" else 0.1  # h264: two YUV->RGB conversions may differ by a level
    torch.testing.assert_close(_pixel_values(ours, media), expected["pixel_values_videos"], rtol=0, atol=atol)


def test_mm_processor_kwargs_reach_videos(ours, hf):
    frames = np.random.default_rng(9).integers(0, 256, (4, 300, 400, 3), dtype=np.uint8)
    video = video_from_frames(frames, 2.0)
    size = {"shortest_edge": 4096, "longest_edge": 4 * 128 * 128}
    expected = _hf_call(hf, VISION.format("<|video_pad|>"), videos=[frames], do_sample_frames=False,
                        video_metadata=[{"fps": 2.0, "frames_indices": [0, 1, 2, 3], "total_num_frames": 4}],
                        size=size)
    media = ours.process_video(frames, 2.0, {"max_pixels": size["longest_edge"]}, metadata=video)
    assert media.grid_thw == tuple(expected["video_grid_thw"][0].tolist())
    assert media.grid_thw != ours.process_video(frames, 2.0, metadata=video).grid_thw


def test_bare_arrays_and_single_frames_are_refused(ours):
    frames = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="needs video metadata"):
        ours.process_video(frames, 2.0)
    one = video_from_frames(frames[:1], 2.0)
    with pytest.raises(ValueError, match="at least 2 frames"):
        ours.process_video(one.frames, one.fps, metadata=one)
    with pytest.raises(ValueError, match="frames_indices"):
        video_from_metadata(frames, {"fps": 2.0, "frames_indices": [0, 1]})
    with pytest.raises(ValueError, match="fps"):
        video_from_metadata(frames, {"frames_indices": [0, 1, 2, 3]})
    with pytest.raises(ValueError, match="cannot sample 1000000000 frames"):  # no giant index arrays
        video_from_metadata(frames, {"fps": 2.0, "do_sample_frames": True}, {"nframes": 10**9, "fps": None})
