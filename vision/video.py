"""Video bytes (or frames given directly) -> the sampled RGB frames a Qwen-style processor consumes.
Callers: the API process (`app.routes.chat`, `engine.frontend`) after `MediaFetcher`.

Frame selection follows qwen-vl-utils (`smart_nframes` + `torch.linspace(0, total - 1, n).round()`),
which is what Qwen2-VL / Qwen2.5-VL were trained with and what vLLM reproduces:
    n = nframes rounded to FRAME_FACTOR                                  (if nframes is given)
    n = floor2(min(max(total / video_fps * fps, ceil2(min_frames)), floor2(max_frames), total))
The sampled-frame rate `n / total * video_fps` is returned as `fps` (M-RoPE's second_per_grid_t).
Qwen3-VL samples as transformers' Qwen3VLVideoProcessor does instead (`sampling="transformers"`):
    n = nframes (if given), else min(max(int(total / video_fps * fps), min_frames), max_frames, total)
    indices = np.linspace(0, total - 1, n).round()
and times its frames from their source numbers: `frame_indices / video_fps`.

Decoding uses PyAV. Frames are numbered in decode order (as torchvision/decord do). When the wanted
frames are far apart we seek to the keyframe before each one instead of decoding everything in
between; after a seek the frame number comes from its timestamp (constant-frame-rate assumption,
which is also what the index-based readers assume).
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass

import av
import numpy as np
import torch
from PIL import Image

from vision.image import to_rgb
from vision.inputs import MediaError

FRAME_FACTOR = 2
FPS = 2.0
# Frames given without metadata: transformers' `VideoMetadata.sampled_fps` falls back to 24 frames
# per second (Qwen2.5-VL: second_per_grid_t = temporal_patch_size / 24). Qwen2-VL and InternVL
# positions do not depend on time, so only Qwen2.5-VL sees the value.
FRAMES_WITHOUT_METADATA_FPS = 24.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
MAX_TOTAL_FRAMES = 10_000_000  # metadata beyond this (or fps outside (0, 1000]) is refused
MAX_VIDEO_FPS = 1000.0
DEFAULT_MAX_FRAME_PIXELS = 8192 * 8192
SEEK_MIN_GAP = 48  # decode straight through gaps shorter than this many frames


@dataclass(frozen=True)
class VideoFrames:
    frames: np.ndarray  # [T, H, W, 3] uint8 RGB, the sampled frames
    fps: float  # rate of the sampled frames (second_per_grid_t = temporal_patch_size / fps)
    total_frames: int  # frames in the source video
    video_fps: float  # the source's frame rate
    frame_indices: tuple[int, ...] = ()  # source frame number of each sampled frame


def smart_nframes(total_frames: int, video_fps: float, *, fps: float | None = FPS, min_frames: int = FPS_MIN_FRAMES,
                  max_frames: int = FPS_MAX_FRAMES, nframes: int | None = None) -> int:
    """qwen-vl-utils' frame count (see module docstring); MediaError if it falls outside [2, total].
    A one-frame video (shorter than a temporal patch) gives its one frame, as vLLM's loader does: the
    processors pad the temporal patch with copies of it, as transformers' do (qwen-vl-utils raises)."""
    if nframes is None and total_frames < FRAME_FACTOR:
        return total_frames
    if nframes is not None:
        count = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        lower = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
        upper = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
        wanted = total_frames / video_fps * (FPS if fps is None else fps)
        count = math.floor(min(max(wanted, lower), upper, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= count <= total_frames:
        possible = (f"between {FRAME_FACTOR} and {total_frames} are possible" if total_frames >= FRAME_FACTOR
                    else "leave the frame count unset to use its one frame")
        raise MediaError(f"cannot sample {count} frames from a video of {total_frames} frame(s); {possible}")
    return int(count)


def sample_frame_indices(total_frames: int, num_frames: int) -> list[int]:
    return torch.linspace(0, total_frames - 1, num_frames).round().long().tolist()


def transformers_frame_indices(total_frames: int, video_fps: float, *, fps: float | None = FPS,
                               min_frames: int = FPS_MIN_FRAMES, max_frames: int = FPS_MAX_FRAMES,
                               nframes: int | None = None) -> list[int]:
    """transformers' Qwen3VLVideoProcessor.sample_frames (module docstring)."""
    if nframes is None:
        count = int(total_frames / video_fps * (FPS if fps is None else fps))
        count = min(max(count, min_frames), max_frames, total_frames)
    else:
        count = int(nframes)
    if not 1 <= count <= total_frames:  # transformers would repeat frames past the total; a request may not
        raise MediaError(f"cannot sample {count} frames from a video of {total_frames} frame(s); "
                         f"between 1 and {total_frames} are possible")
    return np.linspace(0, total_frames - 1, count).round().astype(int).tolist()


def frame_indices(sampling: str, total_frames: int, video_fps: float, **kwargs) -> list[int]:
    """The source frames to keep: qwen-vl-utils' rule or transformers' Qwen3-VL rule."""
    if sampling == "transformers":
        return transformers_frame_indices(total_frames, video_fps, **kwargs)
    if sampling != "qwen_vl_utils":
        raise ValueError(f"unknown video sampling {sampling!r} (qwen_vl_utils or transformers)")
    return sample_frame_indices(total_frames, smart_nframes(total_frames, video_fps, **kwargs))


@dataclass(frozen=True)
class VideoDecodeLimits:
    """Server-side bounds on one video (SECURITY.md lists them with their flags)."""

    max_pixels: int = DEFAULT_MAX_FRAME_PIXELS  # one frame's width * height
    max_duration_s: float = 3600.0  # declared frames / frame rate
    max_decoded_frames: int = 20_000  # frames run through the decoder (seeking skips some)
    max_decode_s: float = 30.0  # wall-clock time spent decoding

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_duration_s", "max_decoded_frames", "max_decode_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"VideoDecodeLimits.{name} must be positive, got {getattr(self, name)}")


def decode_video(data: bytes, *, fps: float | None = None, min_frames: int = FPS_MIN_FRAMES,
                 max_frames: int = FPS_MAX_FRAMES, nframes: int | None = None,
                 max_pixels: int | None = None, limits: VideoDecodeLimits | None = None,
                 sampling: str = "qwen_vl_utils") -> VideoFrames:
    """Decode only the frames qwen-vl-utils would keep: `nframes` frames, or `fps` (default 2.0)
    frames per second within [min_frames, max_frames]. `limits` bound frame size, duration, decoded
    frames and decode time (`max_pixels`, if given, overrides limits.max_pixels)."""
    limits = limits or VideoDecodeLimits()
    if max_pixels is not None:
        limits = VideoDecodeLimits(max_pixels, limits.max_duration_s, limits.max_decoded_frames, limits.max_decode_s)
    if fps is not None and nframes is not None:
        raise ValueError("fps and nframes are mutually exclusive; pass one")
    if not data:
        raise MediaError("the video is empty")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception:  # noqa: BLE001
        raise MediaError("the data is not a supported video container") from None
    with container:
        stream = _video_stream(container, limits.max_pixels)
        video_fps = _video_fps(stream)
        total_frames = _total_frames(data, stream)
        if total_frames / video_fps > limits.max_duration_s:
            raise MediaError(f"the video is too long: {total_frames / video_fps:.0f} s declared, at most "
                             f"{limits.max_duration_s:g} s allowed")
        indices = frame_indices(sampling, total_frames, video_fps, fps=fps, min_frames=min_frames,
                                max_frames=max_frames, nframes=nframes)
        count = len(indices)
        frames = _read_frames(container, stream, indices, video_fps, limits)
    return VideoFrames(frames=np.stack(frames), fps=count / max(total_frames, 1e-6) * video_fps,
                       total_frames=total_frames, video_fps=video_fps, frame_indices=tuple(indices))


def video_sampling_kwargs(defaults: dict, mm_kwargs: dict | None) -> dict:
    """decode_video keyword arguments from a processor's defaults overridden by a request's
    mm_processor_kwargs: fps, min_frames, max_frames, or a fixed frame count (num_frames/nframes)."""
    merged = {**defaults, **(mm_kwargs or {})}
    sampling = {key: merged[key] for key in ("fps", "min_frames", "max_frames") if key in merged}
    num_frames = merged.get("num_frames", merged.get("nframes"))
    if num_frames is not None:
        sampling.update(nframes=num_frames, fps=None)
    return sampling


def video_from_frames(frames: list[Image.Image] | np.ndarray, fps: float = FRAMES_WITHOUT_METADATA_FPS) -> VideoFrames:
    """Frames given directly (already sampled at `fps` frames per second): RGB uint8 [T, H, W, 3].
    Without an fps the frames are taken as 24 per second, as transformers does (see below)."""
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
            raise MediaError(f"video frames must be a uint8 array [T, H, W, 3] with T >= 1, got "
                             f"{frames.dtype} {list(frames.shape)}")
        array = np.ascontiguousarray(frames)
    else:
        if not frames:
            raise MediaError("the video has no frames")
        rgb = [np.asarray(to_rgb(frame)) for frame in frames]
        if len({f.shape for f in rgb}) != 1:
            raise MediaError("all video frames must have the same size")
        array = np.stack(rgb)
    return VideoFrames(frames=array, fps=float(fps), total_frames=len(array), video_fps=float(fps),
                       frame_indices=tuple(range(len(array))))


def video_from_metadata(frames, metadata: dict, sampling_kwargs: dict | None = None) -> VideoFrames:
    """vLLM's offline video form: (frames [T, H, W, 3] uint8 or PIL frames, metadata dict with fps,
    frames_indices, total_num_frames, duration, do_sample_frames; other keys are ignored).
    With do_sample_frames the frames are the whole video and are sampled here (transformers' Qwen3-VL
    rule, `sampling_kwargs`). Without, they are already sampled: frames_indices says which source
    frame each one is, and the sampled rate follows transformers' `VideoMetadata.sampled_fps`:
    len(frames_indices) / total_num_frames * fps when all three are known, else fps."""
    if not isinstance(metadata, dict):
        raise MediaError(f"video metadata must be a dict, got {type(metadata).__name__}")
    video = video_from_frames(frames, fps=1.0)
    video_fps, total = metadata.get("fps"), metadata.get("total_num_frames")
    if isinstance(video_fps, bool) or not isinstance(video_fps, (int, float)) or not 0 < video_fps <= MAX_VIDEO_FPS:
        raise MediaError(f"video metadata fps must be a number in (0, {MAX_VIDEO_FPS:g}], got {video_fps!r}")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int)
                              or not 1 <= total <= MAX_TOTAL_FRAMES):
        raise MediaError(f"video metadata total_num_frames must be a positive integer, got {total!r}")
    num_given = len(video.frames)
    if metadata.get("do_sample_frames"):
        if total is not None and total != num_given:
            raise MediaError(f"video metadata total_num_frames={total} but {num_given} frames "
                             f"were given (do_sample_frames needs the whole video)")
        kwargs = {k: v for k, v in (sampling_kwargs or {}).items() if k != "sampling"}
        indices = transformers_frame_indices(num_given, float(video_fps), **kwargs)
        return VideoFrames(frames=video.frames[indices], fps=len(indices) / num_given * video_fps,
                           total_frames=num_given, video_fps=float(video_fps), frame_indices=tuple(indices))
    given = metadata.get("frames_indices")
    indices = list(range(num_given)) if given is None else [int(i) for i in given]
    if len(indices) != num_given or any(not 0 <= i < (total or MAX_TOTAL_FRAMES) for i in indices):
        raise MediaError(f"video metadata frames_indices must give one source frame per frame ({num_given}), "
                         f"each in [0, total_num_frames), got {len(indices)}")
    sampled_fps = len(indices) / total * video_fps if given is not None and total is not None else video_fps
    return VideoFrames(frames=video.frames, fps=float(sampled_fps), total_frames=total or max(indices) + 1,
                       video_fps=float(video_fps), frame_indices=tuple(indices))


def _video_stream(container, max_pixels: int):
    if not container.streams.video:
        raise MediaError("the file has no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width < 1 or height < 1:
        raise MediaError(f"the video has an invalid frame size {width}x{height}")
    if width * height > max_pixels:
        raise MediaError(f"the video frames are too large: {width}x{height}, at most {max_pixels} pixels allowed")
    stream.thread_type = "AUTO"
    return stream


def _video_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    video_fps = float(rate) if rate else 0.0
    if not 0.0 < video_fps <= MAX_VIDEO_FPS:
        raise MediaError(f"the video reports an invalid frame rate ({video_fps:g} fps)")
    return video_fps


def _total_frames(data: bytes, stream) -> int:
    """Frame count from the header; when absent, count packets in a second pass (demuxing only)."""
    total = stream.frames if stream.frames > 0 else _count_packets(data)
    if not 0 < total <= MAX_TOTAL_FRAMES:
        raise MediaError(f"the video reports an invalid frame count ({total})" if total else "the video has no frames")
    return total


def _count_packets(data: bytes) -> int:
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            return sum(1 for packet in container.demux(video=0) if packet.size > 0)
    except av.error.FFmpegError:
        raise MediaError("the video container is corrupt") from None


def _read_frames(container, stream, indices: list[int], video_fps: float,
                 limits: VideoDecodeLimits) -> list[np.ndarray]:
    reader = _FrameReader(container, stream, video_fps, limits)
    found: dict[int, np.ndarray] = {}
    for target in sorted(set(indices)):
        frame = reader.read(target)
        if frame is None:
            break
        found[target] = frame
    if not found:
        raise MediaError("the video has no decodable frame")
    last = max(found)
    if last < 0.9 * indices[-1]:
        raise MediaError(f"the video has fewer decodable frames ({reader.position}) than its header claims")
    # Frames the header promised but the stream lacks at its very end: repeat the last one.
    frames = [found[index] if index in found else found[last] for index in indices]
    if len({f.shape for f in frames}) != 1:
        raise MediaError("the video changes frame size mid-stream, which is not supported")
    return frames


class _FrameReader:
    """Forward-only access to frame number `target`; seeks to a keyframe across long gaps."""

    def __init__(self, container, stream, video_fps: float, limits: VideoDecodeLimits):
        self._container, self._stream, self._video_fps = container, stream, video_fps
        self._limits, self._num_decoded = limits, 0
        self._deadline = time.monotonic() + limits.max_decode_s
        self._frames = container.decode(stream)
        self.position = 0  # frame number of the next frame `_frames` yields
        self._first_pts: int | None = None
        self._can_seek = True

    def read(self, target: int) -> np.ndarray | None:
        if self._can_seek and self._first_pts is not None and target - self.position > SEEK_MIN_GAP:
            self._seek(target)
        while (frame := self._next_frame()) is not None:
            index, self.position = self.position, self.position + 1
            if index == 0 and self._first_pts is None:
                self._first_pts = frame.pts
                self._can_seek = frame.pts is not None
            if index == target:
                return frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8
        return None

    def _next_frame(self):
        self._num_decoded += 1
        if self._num_decoded > self._limits.max_decoded_frames:
            raise MediaError(f"decoding the video needs more than {self._limits.max_decoded_frames} frames "
                             f"(this server's limit)")
        if time.monotonic() > self._deadline:
            raise MediaError(f"decoding the video took longer than {self._limits.max_decode_s:g} s "
                             f"(this server's limit)")
        try:
            return next(self._frames, None)
        except av.error.FFmpegError:
            raise MediaError("the video data is corrupt") from None

    def _seek(self, target: int) -> None:
        time_base = self._stream.time_base
        offset = self._first_pts + int((target - 0.5) / self._video_fps / time_base)
        try:
            self._container.seek(offset, stream=self._stream, backward=True, any_frame=False)
        except av.error.FFmpegError:
            return self._restart_without_seeking()
        self._frames = self._container.decode(self._stream)
        first = self._next_frame()
        if first is None or first.pts is None:
            return self._restart_without_seeking()
        index = round(float((first.pts - self._first_pts) * time_base) * self._video_fps)
        if index > target:  # the seek overshot: timestamps are not what the frame rate implies
            return self._restart_without_seeking()
        self._frames = _chain_one(first, self._frames)
        self.position = index

    def _restart_without_seeking(self) -> None:
        self._can_seek = False
        try:
            self._container.seek(0, stream=self._stream, backward=True)
        except av.error.FFmpegError:
            raise MediaError("the video's timestamps are inconsistent; it cannot be sampled") from None
        self._frames = self._container.decode(self._stream)
        self.position = 0


def _chain_one(first, rest):
    yield first
    yield from rest
