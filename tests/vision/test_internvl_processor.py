"""InternVL processing vs its two oracles: transformers' InternVLProcessor (the HF-native tiny
checkpoint) and OpenGVLab's published load_image / dynamic_preprocess (written out below, for the
original-layout checkpoint): tile counts, pixel values and expanded prompt ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vision.inputs import IMAGE, VIDEO
from vision.processors import get_processor

# (height, width): square, wide, tall, extreme, tiny, odd, exact multiples, aspect-ratio ties
SIZES = [(56, 56), (60, 170), (170, 60), (20, 400), (7, 9), (133, 97), (112, 168), (300, 240), (80, 100),
         (45, 360)]


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    base = rng.randint(0, 256, size=(max(height // 4, 1), max(width // 4, 1), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((width, height), Image.BILINEAR))
    noise = rng.randint(-20, 21, size=smooth.shape)
    return Image.fromarray(np.clip(smooth.astype(int) + noise, 0, 255).astype(np.uint8))


def _ours(model_dir):
    import json

    config = json.loads((model_dir / "config.json").read_text())
    return get_processor(str(model_dir), config)


def _pixels(processor, media) -> torch.Tensor:
    item = media.to_item(_placeholder(media))
    return processor.pixel_values_from_frames(torch.from_numpy(media.frames), item, torch.float32)


def _placeholder(media):
    from vision.inputs import PlaceholderRange

    return PlaceholderRange(offset=0, length=media.num_tokens)


# ---- transformers' layout -------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tiny_model_dir):
    return tiny_model_dir("internvl")


@pytest.fixture(scope="module")
def hf_processor(hf_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(hf_dir)


@pytest.mark.parametrize("max_patches", [None, 2])
def test_images_match_transformers(hf_dir, hf_processor, max_patches):
    ours = _ours(hf_dir)
    kwargs = {} if max_patches is None else {"max_dynamic_patch": max_patches}
    hf_kwargs = {} if max_patches is None else {"max_patches": max_patches}
    for seed, (height, width) in enumerate(SIZES):
        image = _image(height, width, seed)
        media = ours.process_image(image, kwargs)
        expected = hf_processor(text=["<IMG_CONTEXT>"], images=[image], return_tensors="pt", **hf_kwargs)
        assert media.grid_thw[0] == expected["pixel_values"].shape[0], (height, width)
        assert torch.equal(_pixels(ours, media), expected["pixel_values"]), (height, width)
        assert ours.num_tokens_for_size(IMAGE, height, width, mm_kwargs=kwargs) == media.num_tokens
        ids, ranges = ours.expand_placeholders(ours.tokenizer.encode("<IMG_CONTEXT>"), [media])
        assert ids == expected["input_ids"][0].tolist()
        assert (ranges[0].offset, ranges[0].length) == (0, len(ids))


def test_prompt_with_images_and_video_matches_transformers(hf_dir, hf_processor):
    ours = _ours(hf_dir)
    images = [_image(60, 170, 1), _image(56, 56, 2)]
    video = np.stack([np.asarray(_image(40, 70, 10 + i)) for i in range(4)])  # [4, 40, 70, 3]
    text = "<|im_start|>user\n<IMG_CONTEXT>\nA<video>\nB <IMG_CONTEXT>\nDescribe.<|im_end|>\n"
    expected = hf_processor(text=[text], images=images, videos=[video], return_tensors="pt")
    media = [ours.process_image(images[0]), ours.process_video(video, fps=2.0), ours.process_image(images[1])]
    assert [m.modality for m in media] == [IMAGE, VIDEO, IMAGE]
    ids, ranges = ours.expand_placeholders(ours.tokenizer.encode(text), media)
    assert ids == expected["input_ids"][0].tolist()
    pixels = torch.cat([_pixels(ours, m) for m in media])
    assert torch.equal(pixels, expected["pixel_values"])
    context = ours.context_id
    for item, placeholder in zip(media, ranges):
        span = ids[placeholder.offset:placeholder.offset + placeholder.length]
        assert span.count(context) == item.grid_thw[0] * 4  # 4 tokens per tile
        assert span[-1] == ours.end_id
    assert ours.tokenizer.decode(ids[ranges[1].offset:ranges[1].offset + 8]).startswith("Frame1: ")


def test_bad_requests_raise(hf_dir):
    ours = _ours(hf_dir)
    image = _image(56, 56, 0)
    with pytest.raises(ValueError, match="placeholders for 0 image"):
        ours.expand_placeholders(ours.tokenizer.encode("no placeholder"), [ours.process_image(image)])
    with pytest.raises(ValueError, match="max_dynamic_patch must be a positive integer"):
        ours.process_image(image, {"max_dynamic_patch": 0})
    with pytest.raises(ValueError, match="unsupported mm_processor_kwargs"):
        ours.process_image(image, {"max_pixels": 10})
    with pytest.raises(ValueError, match="larger than"):
        ours.process_image(image, {"min_dynamic_patch": 5, "max_dynamic_patch": 2})


# ---- the original layout: OpenGVLab's published preprocessing -------------------------------

def _opengvlab_load_image(image, input_size=448, max_num=12):
    """OpenGVLab InternVL2.5 model card: build_transform + dynamic_preprocess + load_image."""
    import torchvision.transforms as T
    from torchvision.transforms.functional import InterpolationMode

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    transform = T.Compose([
        T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
        T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(), T.Normalize(mean=mean, std=std)])

    def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
        best_ratio_diff, best_ratio = float("inf"), (1, 1)
        area = width * height
        for ratio in target_ratios:
            target_aspect_ratio = ratio[0] / ratio[1]
            ratio_diff = abs(aspect_ratio - target_aspect_ratio)
            if ratio_diff < best_ratio_diff:
                best_ratio_diff, best_ratio = ratio_diff, ratio
            elif ratio_diff == best_ratio_diff:
                if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                    best_ratio = ratio
        return best_ratio

    def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
        orig_width, orig_height = image.size
        aspect_ratio = orig_width / orig_height
        target_ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                            for j in range(1, n + 1) if i * j <= max_num and i * j >= min_num)
        target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
        target_aspect_ratio = find_closest_aspect_ratio(aspect_ratio, target_ratios, orig_width, orig_height,
                                                        image_size)
        target_width = image_size * target_aspect_ratio[0]
        target_height = image_size * target_aspect_ratio[1]
        blocks = target_aspect_ratio[0] * target_aspect_ratio[1]
        resized_img = image.resize((target_width, target_height))
        processed_images = []
        for i in range(blocks):
            box = ((i % (target_width // image_size)) * image_size, (i // (target_width // image_size)) * image_size,
                   ((i % (target_width // image_size)) + 1) * image_size,
                   ((i // (target_width // image_size)) + 1) * image_size)
            processed_images.append(resized_img.crop(box))
        if use_thumbnail and len(processed_images) != 1:
            processed_images.append(image.resize((image_size, image_size)))
        return processed_images

    images = dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
    return torch.stack([transform(tile) for tile in images])


@pytest.fixture(scope="module")
def original_dir(tiny_model_dir):
    return tiny_model_dir("internvl_chat")


@pytest.mark.parametrize("max_num", [6, 3])
def test_original_layout_matches_opengvlab_load_image(original_dir, max_num):
    ours = _ours(original_dir)
    kwargs = {"max_dynamic_patch": max_num} if max_num != 6 else None  # 6 is the config's default
    for seed, (height, width) in enumerate(SIZES):
        image = _image(height, width, seed)
        media = ours.process_image(image, kwargs)
        expected = _opengvlab_load_image(image, input_size=56, max_num=max_num)
        assert media.grid_thw[0] == expected.shape[0], (height, width)
        assert torch.equal(_pixels(ours, media), expected), (height, width)


def test_original_layout_video_frames_are_single_tiles(original_dir):
    ours = _ours(original_dir)
    frames = np.stack([np.asarray(_image(40, 70, 20 + i)) for i in range(4)])
    media = ours.process_video(frames, fps=1.0)
    expected = torch.cat([_opengvlab_load_image(Image.fromarray(f), input_size=56, max_num=1) for f in frames])
    assert torch.equal(_pixels(ours, media), expected)


def test_text_image_placeholder_with_merged_newline(original_dir):
    """The InternVL2.5 template writes "<image>\\n": ">\\n" is one BPE token in this tokenizer; the
    expansion equals tokenizing the prompt with the replacement text spliced in (OpenGVLab's chat)."""
    ours = _ours(original_dir)
    media = ours.process_image(_image(60, 170, 3))
    prompt = "<|im_start|>user\n<image>\nDescribe this image.<|im_end|>\n"
    ids, ranges = ours.expand_placeholders(ours.tokenizer.encode(prompt), [media])
    replacement = "<img>" + "<IMG_CONTEXT>" * (4 * media.grid_thw[0]) + "</img>"
    assert ids == ours.tokenizer.encode(prompt.replace("<image>", replacement))
    assert ids[ranges[0].offset] == ours.start_id and ranges[0].length == 2 + 4 * media.grid_thw[0]
