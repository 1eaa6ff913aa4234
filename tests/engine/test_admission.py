"""Early media admission against transformers' own token counts (Qwen2-VL image processor):
refused at once with the numbers when the request can never fit, never refused when the exact
expanded prompt would fit."""

import pytest
from PIL import Image
from transformers import AutoProcessor

from engine.config_loader import create_engine_config
from engine.frontend import Frontend, MediaInput
from engine.sampling_params import SamplingParams

PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen2_5_vl")


def _frontend(model_dir, max_model_len):
    return Frontend(create_engine_config(model=str(model_dir), device="cpu", max_model_len=max_model_len))


def _hf_tokens(model_dir, width, height) -> int:
    processor = AutoProcessor.from_pretrained(model_dir)
    grid = processor.image_processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"]
    return int(grid.prod()) // processor.image_processor.merge_size ** 2


def test_oversized_image_is_refused_with_its_token_count(model_dir):
    frontend = _frontend(model_dir, 1024)
    admission = frontend.media_admission(PROMPT, 1)
    expected = _hf_tokens(model_dir, 2048, 2048)
    assert expected > 1024
    with pytest.raises(ValueError) as info:
        admission.admit("image", 2048, 2048)
    message = str(info.value)
    assert "image 2048×2048" in message and f"{expected:,} tokens" in message and "limit 1,024" in message


@pytest.mark.parametrize("size", [(64, 48), (300, 200), (600, 420), (900, 700)])
def test_admission_never_refuses_what_the_exact_check_accepts(model_dir, size):
    max_model_len = 800
    frontend = _frontend(model_dir, max_model_len)
    params = SamplingParams(max_tokens=1)
    try:
        frontend.make_request("r", PROMPT, [MediaInput("image", Image.new("RGB", size))], params,
                              add_special_tokens=False)
        fits = True
    except ValueError:
        fits = False
    admission = frontend.media_admission(PROMPT, 1)
    if fits:
        assert admission.admit("image", *size) == _hf_tokens(model_dir, *size)
    else:  # too big: the early check must say so too (the text here is far below the allowance)
        with pytest.raises(ValueError, match="--max-model-len"):
            admission.admit("image", *size)


def test_running_total_across_items_and_detail_low(model_dir):
    frontend = _frontend(model_dir, 1200)
    admission = frontend.media_admission(PROMPT + PROMPT, 2)
    first = admission.admit("image", 448, 448, detail="low")
    assert first == _hf_tokens(model_dir, 448, 448)
    with pytest.raises(ValueError, match="other media"):
        admission.admit("image", 1400, 1000)
