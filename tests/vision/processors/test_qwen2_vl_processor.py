"""Qwen2-VL processor vs transformers 5.23's own processors, loaded from the tiny checkpoint.

Oracle: AutoImageProcessor / AutoVideoProcessor / AutoProcessor on the same directory. For images
the HF side gets the image as PIL opens it (EXIF transposed, original mode) wherever transformers'
RGB conversion equals ours, so decode + process is checked end to end; for 16-bit / float modes
(where we deliberately scale instead of clipping) it gets our decoded RGB image.
"""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoVideoProcessor

from vision.image import decode_image
from vision.inputs import PlaceholderRange
from vision.processors import get_processor
from vision.processors.qwen2_vl import LOW_DETAIL_MAX_PIXELS
from vision.video import decode_video

HF_CONVERTS_LIKE_US = {"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "1"}


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def model_dir(request, tiny_model_dir):
    return tiny_model_dir(request.param)


@pytest.fixture(scope="module")
def ours(model_dir):
    return get_processor(str(model_dir), AutoConfig.from_pretrained(model_dir))


def _pixel_values(processor, media):
    item = media.to_item(PlaceholderRange(0, media.num_tokens))
    return processor.pixel_values_from_frames(torch.from_numpy(media.frames), item, torch.float32)


def _png(array, mode=None, **save):
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def _generated_images():
    rng = np.random.default_rng(0)
    images = {}
    for orientation in range(1, 9):  # every EXIF orientation, on a non-square JPEG
        exif = Image.Exif()
        exif[0x0112] = orientation
        images[f"exif{orientation}"] = _png(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8),
                                            format="JPEG", quality=95, exif=exif.tobytes())
    images["rgba_alpha_gradient"] = _png(np.dstack([rng.integers(0, 256, (50, 90, 3), dtype=np.uint8),
                                                    np.tile(np.linspace(0, 255, 90, dtype=np.uint8), (50, 1))]))
    palette = Image.fromarray(rng.integers(0, 4, (33, 47), dtype=np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=2)
    images["palette_transparent"] = buf.getvalue()
    images["int32"] = _png(rng.integers(0, 60000, (40, 52), dtype=np.int32).astype(np.int32), format="TIFF")
    images["float"] = _png(rng.random((30, 64), dtype=np.float32), format="TIFF")
    images["large"] = _png(rng.integers(0, 256, (700, 1000, 3), dtype=np.uint8))
    return images



def _image_cases(media_dir):
    cases = {path.name: path.read_bytes() for path in sorted(media_dir.iterdir())
             if path.suffix in (".png", ".jpg", ".gif")}
    cases.update(_generated_images())
    return cases


def test_images_match_transformers(model_dir, ours, media_dir):
    hf = AutoImageProcessor.from_pretrained(model_dir)
    cases = _image_cases(media_dir)
    assert len(cases) >= 20
    modes = set()
    for name, data in cases.items():
        raw = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        modes.add(raw.mode)
        decoded = decode_image(data, max_pixels=10**8)
        hf_input = raw if raw.mode in HF_CONVERTS_LIKE_US else decoded
        expected = hf(images=[hf_input], return_tensors="pt")
        media = ours.process_image(decoded)
        assert media.grid_thw == tuple(expected["image_grid_thw"][0].tolist()), name
        assert media.num_tokens == expected["image_grid_thw"][0].prod().item() // 4, name
        torch.testing.assert_close(_pixel_values(ours, media), expected["pixel_values"], rtol=0, atol=1e-6,
                                   msg=name)
    assert {"RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "F"} <= modes


@pytest.mark.parametrize("mm_kwargs, detail, hf_kwargs", [
    ({"max_pixels": 64 * 28 * 28}, None, {"max_pixels": 64 * 28 * 28}),
    ({"min_pixels": 2000 * 28 * 28}, "auto", {"min_pixels": 2000 * 28 * 28}),
    ({"size": {"shortest_edge": 3136, "longest_edge": 20000}}, "high", {"max_pixels": 20000}),
    (None, "low", {"max_pixels": LOW_DETAIL_MAX_PIXELS}),
    ({"max_pixels": 100 * 28 * 28}, "low", {"max_pixels": 100 * 28 * 28}),
])
def test_pixel_budget_changes_tokens_like_transformers(model_dir, ours, mm_kwargs, detail, hf_kwargs):
    hf = AutoImageProcessor.from_pretrained(model_dir, **hf_kwargs)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (900, 1300, 3), dtype=np.uint8))
    default_tokens = ours.process_image(image).num_tokens
    expected = hf(images=[image], return_tensors="pt")
    media = ours.process_image(image, mm_kwargs, detail)
    assert media.grid_thw == tuple(expected["image_grid_thw"][0].tolist())
    assert media.num_tokens != default_tokens
    torch.testing.assert_close(_pixel_values(ours, media), expected["pixel_values"], rtol=0, atol=1e-6)
    assert ours.num_tokens_for_size("image", 900, 1300, mm_kwargs=mm_kwargs, detail=detail) == media.num_tokens


def test_num_tokens_for_size_matches_transformers(model_dir, ours):
    hf = AutoProcessor.from_pretrained(model_dir)
    sizes = [(1, 1), (27, 29), (448, 448), (720, 1280), (40, 1200), (3000, 4000)]
    expected = hf._get_num_multimodal_tokens(image_sizes=sizes, video_sizes=[(8, h, w) for h, w in sizes])
    assert [ours.num_tokens_for_size("image", h, w) for h, w in sizes] == expected["num_image_tokens"]
    assert [ours.num_tokens_for_size("video", h, w, num_frames=8) for h, w in sizes] == expected["num_video_tokens"]
    assert ours.num_tokens_for_size("image", 448, 448) == 256  # REFERENCE.md


def _video_oracle(model_dir, frames, **kwargs):
    hf = AutoVideoProcessor.from_pretrained(model_dir, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf(videos=[frames], return_tensors="pt", do_sample_frames=False)


@pytest.mark.parametrize("num_frames", [1, 4, 7])
def test_videos_match_transformers(model_dir, ours, num_frames):
    frames = np.random.default_rng(num_frames).integers(0, 256, (num_frames, 90, 130, 3), dtype=np.uint8)
    expected = _video_oracle(model_dir, frames, cap_pixels_per_frame=False)
    media = ours.process_video(frames, fps=2.0)
    assert media.grid_thw == tuple(expected["video_grid_thw"][0].tolist())
    assert media.second_per_grid_t == 2 / 2.0
    torch.testing.assert_close(_pixel_values(ours, media), expected["pixel_values_videos"], rtol=0, atol=1e-6)
    assert ours.num_tokens_for_size("video", 90, 130, num_frames=num_frames) == media.num_tokens


def test_decoded_sample_videos_match_transformers(model_dir, ours, media_dir):
    for name in ("lossless.mov", "h264.mp4"):
        video = decode_video((media_dir / name).read_bytes(), fps=2.0)
        expected = _video_oracle(model_dir, video.frames, cap_pixels_per_frame=False)
        media = ours.process_video(video.frames, fps=video.fps)
        assert media.grid_thw == tuple(expected["video_grid_thw"][0].tolist()), name
        torch.testing.assert_close(_pixel_values(ours, media), expected["pixel_values_videos"], rtol=0, atol=1e-6)


def test_video_pixel_cap_matches_transformers(model_dir):
    server_kwargs = {"cap_pixels_per_frame": True, "max_video_tokens": 1000}
    capped = get_processor(str(model_dir), AutoConfig.from_pretrained(model_dir), server_kwargs)
    frames = np.random.default_rng(3).integers(0, 256, (8, 400, 600, 3), dtype=np.uint8)
    expected = _video_oracle(model_dir, frames, **server_kwargs)
    media = capped.process_video(frames, fps=1.0)
    assert media.grid_thw == tuple(expected["video_grid_thw"][0].tolist())
    assert media.grid_thw != get_processor(str(model_dir), AutoConfig.from_pretrained(model_dir)).process_video(
        frames, fps=1.0).grid_thw
    torch.testing.assert_close(_pixel_values(capped, media), expected["pixel_values_videos"], rtol=0, atol=1e-6)


def test_expand_placeholders_matches_transformers_processor(model_dir, ours):
    hf = AutoProcessor.from_pretrained(model_dir)
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(60, 90), (200, 50)]]
    frames = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    vision = "<|vision_start|>{}<|vision_end|>"
    text = ("a " + vision.format("<|image_pad|>") + " b " + vision.format("<|video_pad|>") + " c "
            + vision.format("<|image_pad|>") + " d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = hf(text=[text], images=images, videos=[frames], return_tensors="pt",
                      videos_kwargs={"do_sample_frames": False})
    media = [ours.process_image(images[0]), ours.process_video(frames, fps=2.0), ours.process_image(images[1])]
    prompt_ids = hf.tokenizer(text)["input_ids"]
    ids, ranges = ours.expand_placeholders(prompt_ids, media)
    assert ids == expected["input_ids"][0].tolist()
    for item, placeholder in zip(media, ranges):
        pad = ours.config.image_token_id if item.modality == "image" else ours.config.video_token_id
        assert ids[placeholder.offset:placeholder.offset + placeholder.length] == [pad] * item.num_tokens
        assert ids[placeholder.offset - 1] != pad and ids[placeholder.offset + placeholder.length] != pad
    with pytest.raises(ValueError, match="order"):
        ours.expand_placeholders(prompt_ids, [media[1], media[0], media[2]])
    with pytest.raises(ValueError, match="2 image"):
        ours.expand_placeholders(prompt_ids, media[:2])


def test_request_kwargs_are_bounded_and_validated(ours):
    image = Image.new("RGB", (64, 64))
    server_max = ours.config.image.max_pixels
    with pytest.raises(ValueError, match="max_pixels must be at most"):
        ours.process_image(image, {"max_pixels": server_max + 1})
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        ours.process_image(image, {"min_pixels": 5000, "max_pixels": 4000})
    with pytest.raises(ValueError, match="unsupported mm_processor_kwargs"):
        ours.process_image(image, {"do_resize": False})
    with pytest.raises(ValueError, match="detail"):
        ours.process_image(image, None, detail="medium")
    with pytest.raises(ValueError, match="get_processor|no media processor"):
        get_processor(".", {"architectures": ["LlamaForCausalLM"]})


def test_mm_hash_follows_pixels_settings_and_uuid(ours):
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))
    same = Image.fromarray(np.array(image))
    other = Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))
    base = ours.process_image(image).mm_hash
    assert ours.process_image(same).mm_hash == base
    assert ours.process_image(other).mm_hash != base
    assert ours.process_image(image, {"min_pixels": 56 * 56 * 4}).mm_hash != base
    assert ours.process_image(image, uuid="cat-1").mm_hash == ours.process_image(other, uuid="cat-1").mm_hash
    assert ours.process_image(image, uuid="cat-1").mm_hash != ours.process_image(image, uuid="cat-2").mm_hash
    frames = rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    assert ours.process_video(frames, fps=2.0).mm_hash != ours.process_video(frames, fps=1.0).mm_hash


def test_item_round_trip_keeps_frames(ours):
    media = ours.process_image(Image.new("RGB", (70, 30), (10, 20, 30)))
    item = media.to_item(PlaceholderRange(3, media.num_tokens))
    assert np.frombuffer(item.frames, np.uint8).reshape(item.frames_shape).tolist() == media.frames.tolist()
    with pytest.raises(ValueError):
        media.to_item(PlaceholderRange(3, media.num_tokens + 1))


def test_unresized_image_hands_on_pils_bytes_and_matches_transformers(model_dir, ours):
    """448x448 (W1's size) needs no resize: the item's frames are the bytes np.asarray(image)
    made, not a copy, and the engine's pixel values from them equal transformers'."""
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    media = ours.process_image(image)
    item = media.to_item(PlaceholderRange(0, media.num_tokens))
    assert np.shares_memory(np.frombuffer(item.frames, np.uint8), media.frames)
    frames = torch.frombuffer(bytearray(item.frames), dtype=torch.uint8).view(item.frames_shape)
    expected = AutoImageProcessor.from_pretrained(model_dir)(images=[image], return_tensors="pt")
    torch.testing.assert_close(ours.pixel_values_from_frames(frames, item, torch.float32),
                               expected["pixel_values"], rtol=0, atol=1e-6)
    resized = ours.process_image(image.resize((300, 200)))   # resized frames: their own bytes
    assert resized.to_item(PlaceholderRange(0, resized.num_tokens)).frames == resized.frames.tobytes()
