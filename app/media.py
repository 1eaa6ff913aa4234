"""Media of a chat request: count the parts against `--limit-mm-per-prompt` (before anything is
fetched), then fetch (async, vision.fetch.MediaFetcher) and decode off the event loop.

Caller: app.routes.chat and app.routes.tokenize. Decoding is CPU work (PIL, PyAV): images go to the
server's worker processes (vision.decode_pool; base64 included) after their size, read from the
header in this process, was admitted; videos and --media-decode-workers 0 use a worker thread.
Fetches of one request run concurrently. Every failure is a ValueError
(vision.inputs.MediaError) with a user-facing message -> HTTP 400.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.protocol import ChatMessage, ImageURLPart, InputAudioPart, VideoURLPart
from vision.fetch import data_url_head, is_data_url
from vision.image import DEFAULT_MAX_PIXELS, decode_image, header_size
from vision.inputs import MediaError
from vision.limits import MultiModalLimits
from vision.video import VideoDecodeLimits, decode_video

PART_MODALITY = {ImageURLPart: "image", VideoURLPart: "video"}


def count_media(messages: list[ChatMessage]) -> dict[str, int]:
    """modality -> number of parts; refuses part types this server cannot serve."""
    counts: dict[str, int] = {}
    for message in messages:
        if not isinstance(message.content, list):
            continue
        for part in message.content:
            if isinstance(part, InputAudioPart):
                raise ValueError("input_audio content parts are not supported: this server takes "
                                 "text, image_url and video_url parts")
            modality = PART_MODALITY.get(type(part))
            if modality:
                counts[modality] = counts.get(modality, 0) + 1
    return counts


def check_media_counts(messages: list[ChatMessage], limits: MultiModalLimits) -> dict[str, int]:
    counts = count_media(messages)
    limits.check_counts(counts)
    return counts


@dataclass(frozen=True)
class DecodeLimits:
    """Per-item decode bounds from the server flags (SECURITY.md)."""

    max_image_pixels: int = DEFAULT_MAX_PIXELS
    video: VideoDecodeLimits = field(default_factory=VideoDecodeLimits)


@dataclass(frozen=True)
class MediaPlan:
    """Per-request decoding context: early token admission (engine.admission.MediaAdmission, None
    to skip) and the frame-sampling arguments from the request's mm_processor_kwargs."""

    admission: Any = None
    video_kwargs: dict = field(default_factory=dict)


def media_plan(frontend: Any, rendered: Any, mm_processor_kwargs: dict | None) -> MediaPlan:
    """The plan for a rendered chat (engine.frontend.Frontend, RenderedChat)."""
    if not rendered.media or not frontend.is_multimodal:
        return MediaPlan()  # nothing to admit; make_request refuses media for text-only models
    admission = frontend.media_admission(rendered.prompt, len(rendered.media), mm_processor_kwargs)
    return MediaPlan(admission, frontend.video_sampling_kwargs(mm_processor_kwargs))


def _decode(ref: Any, data: Any, limits: MultiModalLimits, decode_limits: DecodeLimits, plan: MediaPlan) -> Any:
    is_bytes = isinstance(data, (bytes, bytearray))
    if ref.modality == "image":
        if is_bytes and plan.admission is not None:
            width, height = header_size(bytes(data))  # refuse before the full decode
            plan.admission.admit("image", width, height, detail=ref.detail)
        image = decode_image(data, decode_limits.max_image_pixels) if is_bytes else data
        limits.check_size("image", width=image.width, height=image.height)
        return image
    video = decode_video(bytes(data), limits=decode_limits.video, **plan.video_kwargs) if is_bytes else data
    num_frames, height, width = video.frames.shape[:3]
    limits.check_size("video", width=width, height=height, num_frames=num_frames)
    if plan.admission is not None:
        plan.admission.admit("video", width, height, num_frames)
    return video


def _header_size_or_none(head: bytes) -> tuple[int, int] | None:
    try:
        return header_size(head)
    except MediaError:  # not an image, or the header lies beyond the head: the worker tells
        return None


async def _load_image_in_pool(ref: Any, fetcher: Any, limits: MultiModalLimits, decode_limits: DecodeLimits,
                              on_fetched: Callable[[int], None], plan: MediaPlan, pool: Any) -> Any:
    """Admission from the header (here: 48 KB of base64 at most), then the full decode in a worker.
    A size not readable from the head is admitted after the decode (still within --max-image-pixels)."""
    source = ref.url if is_data_url(ref.url) else await fetcher.fetch(ref.url)
    if isinstance(source, bytes):
        on_fetched(len(source))
    size = _header_size_or_none(source if isinstance(source, bytes) else data_url_head(source))
    if size is not None and plan.admission is not None:
        plan.admission.admit("image", *size, detail=ref.detail)
    image, num_bytes = await pool.decode(source, fetcher.config.max_bytes, decode_limits.max_image_pixels)
    if isinstance(source, str):
        on_fetched(num_bytes)
    if size is None and plan.admission is not None:
        plan.admission.admit("image", image.width, image.height, detail=ref.detail)
    limits.check_size("image", width=image.width, height=image.height)
    return image


async def _load_one(ref: Any, fetcher: Any, limits: MultiModalLimits, decode_limits: DecodeLimits,
                    on_fetched: Callable[[int], None], plan: MediaPlan, pool: Any) -> Any:
    from engine.frontend import MediaInput

    data = ref.data
    if data is None and not ref.url:
        raise ValueError(f"a {ref.modality} part has neither a url nor data")
    if data is None and ref.modality == "image" and pool is not None:
        decoded = await _load_image_in_pool(ref, fetcher, limits, decode_limits, on_fetched, plan, pool)
        return MediaInput(modality=ref.modality, data=decoded, uuid=ref.uuid, detail=ref.detail)
    if data is None:
        data = await fetcher.fetch(ref.url)
        on_fetched(len(data))
    decoded = await asyncio.to_thread(_decode, ref, data, limits, decode_limits, plan)
    return MediaInput(modality=ref.modality, data=decoded, uuid=ref.uuid, detail=ref.detail)


async def load_media(refs: list[Any], fetcher: Any, limits: MultiModalLimits, *,
                     decode_limits: DecodeLimits | None = None,
                     on_fetched: Callable[[int], None] = lambda num_bytes: None,
                     plan: MediaPlan | None = None, pool: Any = None) -> list[Any]:
    """MediaRefs from Frontend.render_chat (prompt order) -> MediaInputs, same order. `on_fetched`
    gets the byte count of each fetched item (queued-media accounting); `plan` admits each item's
    tokens as soon as its size is known and carries the video sampling arguments; `pool`
    (vision.decode_pool.ImageDecodePool, None: threads) decodes the images."""
    decode_limits, plan = decode_limits or DecodeLimits(), plan or MediaPlan()
    tasks = [asyncio.ensure_future(_load_one(ref, fetcher, limits, decode_limits, on_fetched, plan, pool))
             for ref in refs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:  # one bad item (or a disconnect) stops the other fetches at once
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
