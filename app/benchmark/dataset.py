"""Random benchmark prompts, built and encoded in full before the benchmark clock starts.

Caller: app.benchmark.serve. A prompt is `--input-len` random lowercase letters separated by
spaces (a space + letter is one token in the BPE vocabularies of Qwen and most others, so the text
costs about `--input-len` tokens) and, for `random-mm`, `--images-per-request` images of uniformly
random pixels, a fresh image per request so no encoder or prefix cache can serve one from another.
The exact token counts come from the server's usage report, not from this estimate.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import msgspec
import numpy as np

DATASET_NAMES = ("random-mm", "random")
IMAGE_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg")}


@dataclass(frozen=True)
class DatasetConfig:
    dataset_name: str = "random-mm"
    num_prompts: int = 1000
    input_len: int = 64                 # random letters, about one token each
    output_len: int = 128               # max_completion_tokens / max_tokens of every request
    image_size: tuple[int, int] = (448, 448)  # (width, height)
    images_per_request: int = 1         # random-mm only; `random` sends none
    image_format: str = "png"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset_name not in DATASET_NAMES:
            raise ValueError(f"--dataset-name: {self.dataset_name!r} is not one of {', '.join(DATASET_NAMES)}")
        for flag, value in (("num-prompts", self.num_prompts), ("input-len", self.input_len),
                            ("output-len", self.output_len), ("image-size", min(self.image_size))):
            if value < 1:
                raise ValueError(f"--{flag}: must be positive, got {value}")
        if self.images_per_request < 0:
            raise ValueError(f"--images-per-request: must be >= 0, got {self.images_per_request}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"--image-format: {self.image_format!r} is not one of {', '.join(IMAGE_FORMATS)}")

    @property
    def num_images(self) -> int:
        """Images per request actually sent."""
        return self.images_per_request if self.dataset_name == "random-mm" else 0


def parse_image_size(text: str) -> tuple[int, int]:
    """'448x448' (width x height) or '448' (square) -> (width, height)."""
    width, sep, height = text.lower().partition("x")
    try:
        size = (int(width), int(height) if sep else int(width))
    except ValueError:
        raise ValueError(f"--image-size: expected WIDTHxHEIGHT such as 448x448, got {text!r}") from None
    if min(size) < 1:
        raise ValueError(f"--image-size: both sides must be positive, got {text!r}")
    return size


@dataclass(frozen=True)
class SampleRequest:
    body: bytes        # the JSON request body, ready to send
    num_images: int


def random_text(rng: np.random.Generator, num_letters: int) -> str:
    letters = rng.integers(ord("a"), ord("z") + 1, num_letters, dtype=np.uint8)
    return " ".join(chr(letter) for letter in letters)


def image_data_url(rng: np.random.Generator, config: DatasetConfig) -> str:
    from PIL import Image

    width, height = config.image_size
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pil_format, mime = IMAGE_FORMATS[config.image_format]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=pil_format)
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_content(rng: np.random.Generator, config: DatasetConfig) -> list[dict]:
    """The user message's parts: the images, then the text."""
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(rng, config)}}
             for _ in range(config.num_images)]
    return parts + [{"type": "text", "text": random_text(rng, config.input_len)}]


def build_requests(config: DatasetConfig, model: str, is_chat: bool, sampling: dict,
                   num_requests: int | None = None) -> list[SampleRequest]:
    """`num_requests` (default --num-prompts) JSON bodies. `sampling`: fields every body carries
    (temperature, ignore_eos, ...). The completions endpoint takes text only."""
    if not is_chat and config.num_images:
        raise ValueError("images need a chat endpoint (--endpoint /v1/chat/completions), "
                         "or use --dataset-name random / --images-per-request 0")
    rng = np.random.default_rng(config.seed)
    common = {"model": model, "stream": True, "stream_options": {"include_usage": True}, **sampling}
    requests = []
    for _ in range(config.num_prompts if num_requests is None else num_requests):
        if is_chat:
            body = {"messages": [{"role": "user", "content": chat_content(rng, config)}],
                    "max_completion_tokens": config.output_len, **common}
        else:
            body = {"prompt": random_text(rng, config.input_len), "max_tokens": config.output_len, **common}
        requests.append(SampleRequest(body=msgspec.json.encode(body), num_images=config.num_images))
    return requests
