"""ImageDecodePool: images decoded in spawned worker processes. Oracles: vision.image.decode_image
run in this process (same pixels, same errors) and the byte count of the encoded image."""

import asyncio
import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

from vision.decode_pool import ImageDecodePool
from vision.image import decode_image
from vision.inputs import MediaError


def _png(seed: int, mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 40, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pool():
    decoder = ImageDecodePool(1)
    yield decoder
    decoder.close()


def test_same_pixels_as_decoding_here_for_data_urls_and_bytes(pool):
    for data in (_png(0), _png(1, "RGBA")):
        url = "data:image/png;base64," + base64.b64encode(data).decode()
        for source in (url, data):
            image, num_bytes = asyncio.run(pool.decode(source, max_bytes=10**6, max_pixels=10**6))
            assert num_bytes == len(data) and image.mode == "RGB"
            assert np.array_equal(np.asarray(image), np.asarray(decode_image(data)))


@pytest.mark.parametrize("source, message", [
    ("data:image/png;base64,@@@@", "valid base64"),
    (b"not an image", "not a supported image"),
    (_png(2)[:200], "corrupt or truncated"),
    ("data:image/png;base64," + base64.b64encode(_png(3)).decode(), "limit of 100 bytes"),
])
def test_bad_input_gives_the_same_media_error(pool, source, message):
    with pytest.raises(MediaError, match=message):
        asyncio.run(pool.decode(source, max_bytes=100 if isinstance(source, str) and len(source) > 100 else 10**6,
                                max_pixels=10**6))


def test_too_many_pixels_is_refused_in_the_worker(pool):
    with pytest.raises(MediaError, match="too large: 40x24 pixels"):
        asyncio.run(pool.decode(_png(4), max_bytes=10**6, max_pixels=100))


def test_a_dead_worker_fails_one_image_and_the_pool_recovers():
    decoder = ImageDecodePool(1)
    try:
        decoder._current().submit(os._exit, 1)  # the worker dies as if killed for memory
        with pytest.raises(MediaError, match="decoder process failed"):
            for _ in range(20):  # the break is noticed within a few submissions
                asyncio.run(decoder.decode(_png(5), max_bytes=10**6, max_pixels=10**6))
        image, _ = asyncio.run(decoder.decode(_png(5), max_bytes=10**6, max_pixels=10**6))
        assert image.size == (40, 24)
    finally:
        decoder.close()
