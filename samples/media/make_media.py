"""Generate the sample images and videos every media test decodes: odd modes, EXIF rotation, extreme
aspect ratios, animation, a lossless and an H.264 video. Deterministic (content is computed, not random).

Caller: tests/conftest.py (`media_dir` fixture) and humans:  python samples/media/make_media.py --out DIR
`MEDIA` describes every file (mode, size as PIL reports it after opening, frames); `pattern_frames` is the
exact content of the lossless video, so tests can compare decoded pixels with it.
"""

from __future__ import annotations

import argparse
import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

# file name -> what PIL.Image.open reports: (mode, (width, height)) or for videos (frames, fps, (w, h)).
IMAGES = {
    "rgb.png": ("RGB", (200, 150)),
    "exif_rotated.jpg": ("RGB", (160, 90)),   # EXIF orientation 6: upright after transpose is 90x160
    "gray.png": ("L", (96, 64)),
    "rgba.png": ("RGBA", (120, 80)),
    "palette.png": ("P", (100, 100)),
    "cmyk.jpg": ("CMYK", (128, 96)),
    "gray16.png": ("I;16", (80, 60)),
    "la.png": ("LA", (64, 64)),
    "wide.png": ("RGB", (1200, 40)),
    "tall.png": ("RGB", (40, 1200)),
    "animated.gif": ("P", (64, 64)),           # 3 frames
    "one_pixel.png": ("RGB", (1, 1)),
}
VIDEOS = {
    "lossless.mov": (12, 6.0, (160, 120)),     # png codec, rgb24: decodes to exactly pattern_frames(...)
    "h264.mp4": (24, 12.0, (176, 144)),        # libx264, yuv420p
}
EXIF_ORIENTATION_TAG = 0x0112
GIF_FRAMES = 3


def pattern_image(width: int, height: int, index: int = 0) -> np.ndarray:
    """[height, width, 3] uint8: gradients plus a square whose place and colour depend on index."""
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([
        (xs * 255 // max(width - 1, 1)),
        (ys * 255 // max(height - 1, 1)),
        ((xs + ys + 40 * index) % 256),
    ], axis=-1).astype(np.uint8)
    side = max(min(width, height) // 4, 1)
    top = (index * 7) % max(height - side, 1)
    left = (index * 11) % max(width - side, 1)
    image[top:top + side, left:left + side] = ((60 * index) % 256, 255 - (30 * index) % 256, 128)
    return image


def pattern_frames(num_frames: int, width: int, height: int) -> np.ndarray:
    """[num_frames, height, width, 3] uint8, every frame different."""
    return np.stack([pattern_image(width, height, index) for index in range(num_frames)])


def _rgb(size: tuple[int, int], index: int = 0) -> Image.Image:
    return Image.fromarray(pattern_image(size[0], size[1], index))


def make_images(out_dir: Path) -> None:
    _rgb(IMAGES["rgb.png"][1]).save(out_dir / "rgb.png")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = 6
    _rgb(IMAGES["exif_rotated.jpg"][1], 1).save(out_dir / "exif_rotated.jpg", quality=95, exif=exif.tobytes())
    _rgb(IMAGES["gray.png"][1], 2).convert("L").save(out_dir / "gray.png")
    rgba = _rgb(IMAGES["rgba.png"][1], 3).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgba.width).astype(np.uint8), (rgba.height, 1))  # left edge transparent
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(out_dir / "rgba.png")
    _rgb(IMAGES["palette.png"][1], 4).quantize(colors=16, dither=Image.Dither.NONE).save(out_dir / "palette.png")
    _rgb(IMAGES["cmyk.jpg"][1], 5).convert("CMYK").save(out_dir / "cmyk.jpg", quality=95)
    width, height = IMAGES["gray16.png"][1]
    gray16 = (np.arange(width * height, dtype=np.uint32).reshape(height, width) * 13 % 65536).astype(np.uint16)
    Image.fromarray(gray16).save(out_dir / "gray16.png")
    _rgb(IMAGES["la.png"][1], 6).convert("LA").save(out_dir / "la.png")
    _rgb(IMAGES["wide.png"][1], 7).save(out_dir / "wide.png")
    _rgb(IMAGES["tall.png"][1], 8).save(out_dir / "tall.png")
    gif_frames = [_rgb(IMAGES["animated.gif"][1], 9 + i).quantize(colors=32, dither=Image.Dither.NONE)
                  for i in range(GIF_FRAMES)]
    gif_frames[0].save(out_dir / "animated.gif", save_all=True, append_images=gif_frames[1:], duration=100, loop=0)
    Image.new("RGB", (1, 1), (200, 30, 90)).save(out_dir / "one_pixel.png")


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [H*3/2, W] uint8 planar BT.601 limited range, 2x2-averaged chroma.

    Done here rather than by libswscale, whose output changed between two encodes in one process.
    """
    r, g, b = (rgb[..., channel].astype(np.float64) for channel in range(3))
    luma = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    blue_diff = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    red_diff = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    height, width = luma.shape
    planes = [luma.reshape(-1)]
    for chroma in (blue_diff, red_diff):
        planes.append(chroma.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3)).reshape(-1))
    return np.clip(np.rint(np.concatenate(planes)), 0, 255).astype(np.uint8).reshape(height * 3 // 2, width)


def encode_video(path: Path, frames: np.ndarray, fps: float, codec: str, pix_fmt: str) -> None:
    """Encode [T, H, W, 3] uint8 frames; single-threaded and bitexact so the bytes are reproducible."""
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "medium", "threads": "1"}
        for frame_array in frames:
            if pix_fmt == "yuv420p":
                frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame_array), format="yuv420p")
            else:
                frame = av.VideoFrame.from_ndarray(frame_array, format=pix_fmt)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def make_videos(out_dir: Path) -> None:
    num_frames, fps, (width, height) = VIDEOS["lossless.mov"]
    encode_video(out_dir / "lossless.mov", pattern_frames(num_frames, width, height), fps, "png", "rgb24")
    num_frames, fps, (width, height) = VIDEOS["h264.mp4"]
    encode_video(out_dir / "h264.mp4", pattern_frames(num_frames, width, height), fps, "libx264", "yuv420p")


def make_all(out_dir: Path) -> Path:
    """Write every file of IMAGES and VIDEOS into out_dir (created); return out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    make_images(out_dir)
    make_videos(out_dir)
    return out_dir


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of image, for tests that need in-memory payloads (data: URLs)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    print(make_all(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
