"""decode_video / video_from_frames. Oracles: qwen_vl_utils' own smart_nframes and linspace indexing,
frame numbers written into the pixels of generated videos, and full sequential decoding."""

import io
import time

import av
import numpy as np
import pytest
import torch
from PIL import Image
from qwen_vl_utils import vision_process as qwen

from vision import video as video_module
from vision.inputs import MediaError
from vision.video import decode_video, sample_frame_indices, smart_nframes, video_from_frames

BLOCK, BITS = 8, 12  # frame number written as 12 black/white 8x8 blocks


def _numbered_video(num_frames, fps=30, gop=12, codec="libx264", fmt="mp4", width=96, height=32):
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        for index in range(num_frames):
            frame = np.full((height, width, 3), 128, np.uint8)
            for bit in range(BITS):
                frame[:BLOCK, bit * BLOCK:(bit + 1) * BLOCK] = 255 if index >> bit & 1 else 0
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _frame_numbers(frames):
    rows = frames[:, 2:BLOCK - 2, :BITS * BLOCK]  # [T, 4, BITS * BLOCK, 3], away from block edges
    blocks = rows.reshape(len(frames), BLOCK - 4, BITS, BLOCK, 3)[:, :, :, 2:-2]
    bits = blocks.mean(axis=(1, 3, 4)) > 128  # [T, BITS]
    return (bits * (1 << np.arange(BITS))).sum(axis=1).tolist()


@pytest.mark.parametrize("total, video_fps", [(2, 30.0), (3, 25.0), (7, 1.0), (48, 24.0), (301, 29.97),
                                              (1000, 60.0), (5000, 30.0), (17, 0.5)])
@pytest.mark.parametrize("options", [{}, {"fps": 1.0}, {"fps": 4.0, "min_frames": 6}, {"fps": 0.1},
                                     {"fps": 2.0, "max_frames": 9}, {"nframes": 5}, {"nframes": 2}])
def test_frame_selection_matches_qwen_vl_utils(total, video_fps, options):
    try:
        expected_count = qwen.smart_nframes(dict(options), total_frames=total, video_fps=video_fps)
    except ValueError:
        with pytest.raises(MediaError):
            smart_nframes(total, video_fps, **{"fps": None, **options} if "nframes" in options else options)
        return
    kwargs = {"fps": None, **options} if "nframes" in options else options
    count = smart_nframes(total, video_fps, **kwargs)
    assert count == expected_count
    expected = torch.linspace(0, total - 1, expected_count).round().long().tolist()
    assert sample_frame_indices(total, count) == expected


@pytest.mark.parametrize("codec, fmt", [("libx264", "mp4"), ("mpeg4", "avi"), ("libvpx-vp9", "webm")])
def test_decoded_frames_are_the_selected_ones(codec, fmt):
    data = _numbered_video(600, fps=30, gop=15, codec=codec, fmt=fmt)
    video = decode_video(data, fps=0.5)  # 600 frames at 30 fps, 0.5 fps -> 10 frames, ~66 apart: seeks
    count = qwen.smart_nframes({"fps": 0.5}, total_frames=600, video_fps=30.0)
    expected = torch.linspace(0, 599, count).round().long().tolist()
    assert video.frames.shape == (count, 32, 96, 3) and video.frames.dtype == np.uint8
    assert list(video.frame_indices) == expected
    assert _frame_numbers(video.frames) == expected
    assert video.total_frames == 600 and video.video_fps == 30.0
    assert video.fps == pytest.approx(count / 600 * 30.0)


def test_seeking_gives_the_same_frames_as_decoding_everything(monkeypatch):
    data = _numbered_video(900, fps=30, gop=10)
    sought = decode_video(data, fps=0.3)
    monkeypatch.setattr(video_module, "SEEK_MIN_GAP", 10**9)
    sequential = decode_video(data, fps=0.3)
    assert np.array_equal(sought.frames, sequential.frames)
    assert _frame_numbers(sought.frames) == list(sought.frame_indices)


def test_sparse_sampling_is_fast():
    data = _numbered_video(3000, fps=30, gop=30)
    start = time.perf_counter()
    video = decode_video(data, nframes=4)
    assert _frame_numbers(video.frames) == [0, 1000, 1999, 2999]
    assert time.perf_counter() - start < 2.0


def test_sample_videos(media_dir):
    lossless = decode_video((media_dir / "lossless.mov").read_bytes(), fps=2.0)
    count = qwen.smart_nframes({"fps": 2.0}, total_frames=12, video_fps=6.0)
    assert lossless.frames.shape[0] == count and lossless.total_frames == 12
    from_h264 = decode_video((media_dir / "h264.mp4").read_bytes(), nframes=6, fps=None)
    assert from_h264.frames.shape == (6, 144, 176, 3)


def test_bad_videos_fail_fast():
    good = _numbered_video(30)
    cases = [b"", b"not a video at all" * 10, good[: len(good) // 3]]
    for data in cases:
        start = time.perf_counter()
        with pytest.raises(MediaError):
            decode_video(data)
        assert time.perf_counter() - start < 1.0


def test_one_frame_video_gives_its_frame():
    """qwen-vl-utils raises for a one-frame video; vLLM serves it (its loader returns the one frame and
    the processor pads the temporal patch: tests/vision/processors test one-frame videos against
    transformers). An explicit frame count above the one frame is still an error."""
    with pytest.raises(ValueError):
        qwen.smart_nframes({}, total_frames=1, video_fps=30.0)
    video = decode_video(_numbered_video(1, fps=30))
    assert video.frame_indices == (0,) and _frame_numbers(video.frames) == [0]
    assert video.total_frames == 1 and video.fps == 30.0
    with pytest.raises(MediaError, match="leave the frame count unset"):
        decode_video(_numbered_video(1), nframes=4, fps=None)


@pytest.mark.parametrize("fmt", ["avi", "mp4", "matroska"])
def test_video_without_frames(fmt):
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height = 32, 32
        container.start_encoding()
    with pytest.raises(MediaError, match="no frames|no video stream|not a supported"):
        decode_video(buf.getvalue())


def test_frame_size_cap_is_checked_from_the_header():
    with pytest.raises(MediaError, match="too large"):
        decode_video(_numbered_video(8), max_pixels=96 * 32 - 1)


def test_frames_given_directly():
    array = np.random.default_rng(0).integers(0, 256, (5, 20, 30, 3), dtype=np.uint8)
    video = video_from_frames(array, fps=3.0)
    assert video.frames is not None and np.array_equal(video.frames, array) and video.fps == 3.0
    rgba = [Image.fromarray(np.dstack([frame, np.full((20, 30), 255, np.uint8)]), "RGBA") for frame in array]
    assert np.array_equal(video_from_frames(rgba).frames, array)
    with pytest.raises(MediaError):
        video_from_frames(array[..., :2])
    with pytest.raises(MediaError):
        video_from_frames([])
    with pytest.raises(MediaError, match="same size"):
        video_from_frames([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))])
