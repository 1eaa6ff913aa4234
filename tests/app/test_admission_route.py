"""A chat request whose image header alone shows it can never fit is refused (400, with the
numbers) before the image is decoded or the engine sees the request."""

import base64
import io

from PIL import Image


def _png(width, height) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_chat_route_refuses_before_decoding(make_client, monkeypatch):
    import app.media

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded an image that admission must refuse from its header")

    monkeypatch.setattr(app.media, "decode_image", no_decode)
    client, fake = make_client()
    url = "data:image/png;base64," + base64.b64encode(_png(6000, 6000)).decode()
    body = {"model": "tiny-vl", "max_tokens": 4,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "hi"}]}]}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert "image 6000×6000" in response.json()["error"]["message"]
    assert not fake.requests
