"""decode_image: header-first size check, EXIF, animation, mode conversion, bad bytes.
Oracles: PIL itself (exif_transpose, convert), hand-computed pixel values, hand-built PNG headers."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from vision.image import decode_image, header_size
from vision.inputs import MediaError


def _encode(image, fmt="PNG", **kwargs):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_header_only(width, height):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("max_pixels", [10**8, 10**12])
def test_huge_declared_size_is_refused_before_decoding(max_pixels):
    data = _png_header_only(100_000, 100_000)
    start = time.perf_counter()
    with pytest.raises(MediaError, match="too large"):
        decode_image(data, max_pixels=max_pixels)
    assert time.perf_counter() - start < 0.5


def test_max_pixels_is_exact():
    data = _encode(Image.new("RGB", (100, 50)))
    assert decode_image(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(MediaError, match="100x50"):
        decode_image(data, max_pixels=4999)


@pytest.mark.parametrize("data", [b"", b"definitely not an image", b"GIF89a" + b"\0" * 3])
def test_non_image_bytes(data):
    with pytest.raises(MediaError):
        decode_image(data)


def test_truncated_png():
    data = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(MediaError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    array = np.random.default_rng(orientation).integers(0, 256, (20, 36, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(array), "PNG", exif=exif.tobytes())
    decoded = decode_image(data)
    expected = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert decoded.size == ((20, 36) if orientation >= 5 else (36, 20))
    assert np.array_equal(np.array(decoded), expected)
    if orientation == 1:
        assert np.array_equal(np.array(decoded), array)


def _with_exif_after_the_pixels(png: bytes, orientation: int) -> bytes:
    """An eXIf chunk just before IEND, where Pillow finds it only by decoding the pixels."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    body = exif.tobytes()[len(b"Exif\0\0"):] if exif.tobytes().startswith(b"Exif") else exif.tobytes()
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    iend = png.rindex(b"IEND") - 4
    return png[:iend] + chunk + png[iend:]


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_header_size_agrees_with_the_decoded_size(where, orientation):
    array = np.random.default_rng(orientation).integers(0, 256, (20, 36, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    plain = _encode(Image.fromarray(array), "PNG")
    data = (_encode(Image.fromarray(array), "PNG", exif=exif.tobytes()) if where == "before"
            else _with_exif_after_the_pixels(plain, orientation))
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size  # PIL's full decode: the oracle
    assert expected == ((20, 36) if orientation >= 5 else (36, 20))
    assert header_size(data) == decode_image(data).size == expected


def test_header_size_of_a_png_without_exif_decodes_no_pixels(monkeypatch):
    from PIL import PngImagePlugin

    data = _encode(Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)), "PNG")
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: pytest.fail("the pixels were decoded"))
    assert header_size(data) == (40, 30)


def test_animated_image_gives_first_frame():
    frames = [Image.new("RGB", (16, 16), color) for color in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert np.array(decode_image(data))[0, 0].tolist() == [255, 0, 0]


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)          # transparent -> white
    rgba[0, 1] = (10, 20, 30, 255)     # opaque -> itself
    rgba[1, 0] = (0, 0, 0, 128)        # half black over white -> 255 * 127/255
    rgba[1, 1] = (200, 100, 0, 51)
    out = np.array(decode_image(_encode(Image.fromarray(rgba, "RGBA"))))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert np.abs(out[1, 0].astype(int) - 127).max() <= 1
    expected = np.rint(rgba[1, 1, :3] * 0.2 + 255 * 0.8)
    assert np.abs(out[1, 1].astype(int) - expected).max() <= 1


def test_gray_palette_cmyk_convert_like_pil():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L")
    cmyk = Image.fromarray(np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)).convert("CMYK")
    for image, fmt in [(gray, "PNG"), (gray.convert("P"), "PNG"), (cmyk, "JPEG")]:
        data = _encode(image, fmt)
        expected = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(np.array(decode_image(data)), expected)


def test_high_bit_depth_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    out = np.array(decode_image(_encode(Image.fromarray(values))))
    assert out.shape == (1, 4, 3) and out[0, :, 0].tolist() == [0, 1, 128, 255]
    floats = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert np.array(decode_image(_encode(Image.fromarray(floats), "TIFF")))[0, :, 1].tolist() == [0, 128, 255]
    small_ints = np.array([[0, 100, 255]], dtype=np.int32)
    assert np.array(decode_image(_encode(Image.fromarray(small_ints), "TIFF")))[0, :, 2].tolist() == [0, 100, 255]


def test_sample_media_decode_to_upright_rgb(media_dir):
    rotated = decode_image((media_dir / "exif_rotated.jpg").read_bytes())
    assert rotated.mode == "RGB" and rotated.size == (90, 160)
    for path in media_dir.iterdir():
        if path.suffix in (".png", ".jpg", ".gif"):
            assert decode_image(path.read_bytes()).mode == "RGB", path.name
