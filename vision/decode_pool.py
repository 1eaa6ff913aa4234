"""Image decoding in worker processes, so the API process's event loop (which streams tokens)
never waits on base64, zlib/JPEG decoding or the GIL they hold.

Caller: app.media (one ImageDecodePool per server, `--media-decode-workers`). A worker gets a data
URL (base64 decoded there) or fetched bytes, and returns the upright RGB pixels: what
`vision.image.decode_image` returns, rebuilt here as a PIL image. Measured with bench/api_process.py
on a shared 2-core CPU box, 48 448x448 PNG data URLs arriving at once: the event loop's p99 lag was
11 ms with 2 workers against 185 ms with decoding in threads (the GIL), and 950 ms with base64 on
the loop itself; the price is the pickling of ~800 KB in and 600 KB out per image.

Workers are spawned (never forked: the API process has threads), on first use. A worker that dies
(e.g. killed for memory) fails that image with a MediaError and the pool is replaced.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from PIL import Image

from vision.fetch import decode_data_url
from vision.image import decode_image
from vision.inputs import MediaError


def default_num_workers() -> int:
    """A quarter of the cores, 1 to 8: decoding is a small share of serving's CPU."""
    return min(8, max(1, (os.cpu_count() or 1) // 4))


def decode_in_worker(source: str | bytes, max_bytes: int, max_pixels: int) -> tuple[bytes, int, int, int]:
    """(data URL | bytes) -> (RGB pixels [height, width, 3] as bytes, width, height, source bytes)."""
    data = decode_data_url(source, max_bytes) if isinstance(source, str) else source
    image = decode_image(data, max_pixels)
    return image.tobytes(), image.width, image.height, len(data)


class ImageDecodePool:
    def __init__(self, num_workers: int):
        if num_workers < 1:
            raise ValueError(f"--media-decode-workers: must be positive here, got {num_workers}")
        self.num_workers = num_workers
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(self.num_workers, mp_context=multiprocessing.get_context("spawn"))
            return self._executor

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is broken:
                self._executor = None
        broken.shutdown(wait=False, cancel_futures=True)

    async def decode(self, source: str | bytes, max_bytes: int, max_pixels: int) -> tuple[Image.Image, int]:
        """-> (upright RGB image, decoded source bytes). MediaError for bad input."""
        executor = self._current()
        try:
            pixels, width, height, num_bytes = await asyncio.get_running_loop().run_in_executor(
                executor, decode_in_worker, source, max_bytes, max_pixels)
        except BrokenProcessPool:
            self._replace(executor)
            raise MediaError("the image could not be decoded (its decoder process failed)") from None
        return Image.frombytes("RGB", (width, height), pixels), num_bytes

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
