"""Chat images are decoded by the server's worker processes (vision.decode_pool), after the size
read from the header has been admitted; `media_decode_workers=0` decodes in threads. Oracle: the
image token count of the tiny Qwen2.5-VL processor, (H/28)*(W/28) for sides that are multiples of 28."""

import base64
import io

import numpy as np
from PIL import Image

from vision.decode_pool import ImageDecodePool
from vision.fetch import data_url_head


def _png_url(width: int, height: int) -> str:
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _chat(url: str) -> dict:
    return {"model": "tiny-vl", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]}


def _image_tokens(request) -> int:
    return sum(item.placeholder.length for item in request.mm_items if item.modality == "image")


def test_images_go_through_the_pool_after_header_admission(make_client, monkeypatch):
    calls = []
    decode = ImageDecodePool.decode

    async def counting(self, source, max_bytes, max_pixels):
        calls.append(len(source))
        return await decode(self, source, max_bytes, max_pixels)

    monkeypatch.setattr(ImageDecodePool, "decode", counting)
    client, fake = make_client(media_decode_workers=1)
    assert client.post("/v1/chat/completions", json=_chat(_png_url(112, 56))).status_code == 200
    assert len(calls) == 1 and _image_tokens(fake.requests[0]) == 4 * 2

    async def never(self, *args):
        raise AssertionError("an image that admission must refuse from its header reached the decoder")

    monkeypatch.setattr(ImageDecodePool, "decode", never)
    blank = io.BytesIO()
    Image.new("RGB", (6000, 6000)).save(blank, format="PNG")
    response = client.post("/v1/chat/completions",
                           json=_chat("data:image/png;base64," + base64.b64encode(blank.getvalue()).decode()))
    assert response.status_code == 400 and "image 6000×6000" in response.json()["error"]["message"]


def test_zero_workers_decode_in_threads(make_client, monkeypatch):
    monkeypatch.setattr(ImageDecodePool, "decode", lambda *args: (_ for _ in ()).throw(AssertionError("pool used")))
    client, fake = make_client(media_decode_workers=0)
    assert client.post("/v1/chat/completions", json=_chat(_png_url(56, 84))).status_code == 200
    assert _image_tokens(fake.requests[0]) == 2 * 3


def test_data_url_head_is_the_start_of_the_content():
    data = bytes(range(256)) * 1000
    encoded = base64.b64encode(data).decode()
    head = data_url_head("data:image/png;base64," + encoded[:100] + "\n" + encoded[100:])
    assert 40_000 < len(head) <= 48 * 1024 and head == data[:len(head)]
    short = data_url_head("data:image/png;base64," + base64.b64encode(data[:10]).decode())
    assert short == data[:10]
    assert data_url_head("data:text/plain,hello") == b"" and data_url_head("data:image/png;base64,@@@@") == b""
