"""Image bytes -> an upright RGB PIL image, refusing oversized images before their pixels are
decoded. Callers: the API process (`app.routes.chat`, `engine.frontend`) after `MediaFetcher`.

Decisions (documented because they change pixels):
- Size is read from the header (`Image.open` is lazy) and checked against `max_pixels` before
  `load()`, so a 100000x100000 PNG costs a few bytes of parsing, not 30 GB.
- EXIF orientation is applied (`ImageOps.exif_transpose`), like transformers' `load_image`.
- Animated images (GIF/APNG/WebP): the first frame.
- Transparency (RGBA, LA, PA, P or L/RGB with a transparency key) is composited onto WHITE with
  `Image.alpha_composite`, exactly what transformers' `convert_to_rgb` does to a PIL image in
  its processors (vLLM and qwen-vl-utils' `to_rgb` also use white; they `paste` with the alpha
  mask, which can differ from alpha_composite by 1 level in rounding). So our RGB image fed to
  our processor equals the HF processor fed the original image.
- L, CMYK, YCbCr, 1, P (no transparency): PIL's own `convert("RGB")`, as transformers does.
- 16/32-bit and float modes (I;16*, I, F), where PIL's convert would clip everything above 255 to
  white: I;16* are scaled 65535 -> 255; I is used as-is when its values fit 0..255, else scaled as
  16-bit; F is scaled by 255 when its values lie in 0..1, else clipped to 0..255.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from vision.inputs import MediaError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # well below PIL's own bomb limit of 2 * 89.5 M pixels


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    image = open_image(data)
    check_image_pixels(image.width, image.height, max_pixels)
    try:
        image.seek(0)  # animated: the first frame
        image.load()
        image = ImageOps.exif_transpose(image)
    except MediaError:
        raise
    except Exception:  # noqa: BLE001 - any decoder failure is the input's fault
        raise MediaError("the image data is corrupt or truncated") from None
    return to_rgb(image)


def open_image(data: bytes) -> Image.Image:
    """Parse only the header. Raises MediaError for non-image bytes."""
    if not data:
        raise MediaError("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise MediaError("the image is too large (pixel count over the decoder's safety limit)") from None
    except Exception:  # noqa: BLE001
        raise MediaError("the data is not a supported image (expected PNG, JPEG, WebP, GIF, BMP or TIFF)") from None


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied) from the header alone, no pixel decode."""
    image = open_image(data)
    width, height = image.size
    return (height, width) if _exif_orientation(image, data) in (5, 6, 7, 8) else (width, height)


def _exif_orientation(image: Image.Image, data: bytes) -> int:
    # A PNG's EXIF sits in an eXIf chunk that may follow the pixel data, so Pillow's getexif()
    # decodes every pixel to look for it (as long as the full decode: 11 ms for a 448x448 PNG).
    # No eXIf bytes anywhere in the file means no chunk: orientation 1 without decoding.
    if image.format == "PNG" and "exif" not in image.info and b"eXIf" not in data:
        return 1
    try:
        return image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block just means no rotation
        return 1


def check_image_pixels(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise MediaError(f"the image has an invalid size {width}x{height}")
    if width * height > max_pixels:
        raise MediaError(f"the image is too large: {width}x{height} pixels, at most {max_pixels} allowed")


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        return Image.fromarray(_high_depth_to_uint8(image)).convert("RGB")
    return image.convert("RGB")


def _has_alpha(image: Image.Image) -> bool:
    # transformers' rule: an alpha band, or a palette / colour-key transparency entry.
    return "A" in image.getbands() or image.info.get("transparency") is not None


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    values = np.asarray(image).astype(np.float64)  # [H, W]
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values * (255.0 / 65535.0)
    elif image.mode == "F" and values.min(initial=0) >= 0 and values.max(initial=0) <= 1:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
