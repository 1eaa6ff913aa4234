"""The memory plan's vision share, on the CPU: the largest item the limits admit (oracle: transformers'
Qwen2-VL image processor on the image that reaches max_pixels, and hand arithmetic), the encoder
cache and tower batch derived from it, the KV budget arithmetic, the plan's description, and the
tower profile actually encoding that batch with the tiny model."""


import pytest
from PIL import Image
from transformers import AutoImageProcessor

from engine.config import EngineConfig
from engine.config_loader import create_engine_config
from engine.runner.memory_plan import (MemoryPlan, encoder_plan, kv_cache_budget,
                                       largest_image_size)
from vision.processors import get_processor

MAX_PIXELS = 448 * 448   # 256 rows of 28x28 merged patches


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("qwen2_5_vl"))


def make_config(model_dir, **kwargs) -> EngineConfig:
    return create_engine_config(model=model_dir, device="cpu", dtype="float32",
                               mm_processor_kwargs={"max_pixels": MAX_PIXELS}, **kwargs)


def hf_tokens(model_dir, width: int, height: int) -> int:
    processor = AutoImageProcessor.from_pretrained(model_dir, max_pixels=MAX_PIXELS)
    grid = processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // 4


def test_largest_image_from_the_pixel_bounds(model_dir):
    config = make_config(model_dir, max_model_len=2048, max_num_batched_tokens=1024,
                         limit_mm_per_prompt={"image": 3, "video": 0})
    plan = encoder_plan(config)
    assert plan.modality == "image" and plan.max_tokens_per_item == MAX_PIXELS // 28 ** 2 == 256
    assert hf_tokens(model_dir, 448, 448) == 256 and hf_tokens(model_dir, 4000, 3000) <= 256
    assert plan.cache_size == 1024 and plan.num_items_per_step == 4    # max(batched, item); 1024 // 256
    hidden = config.model_config.hf_config.get_text_config().hidden_size
    assert plan.bytes_per_row == hidden * 4 and plan.cache_bytes == 1024 * hidden * 4
    processor = get_processor(model_dir, config.model_config.hf_config, {"max_pixels": MAX_PIXELS})
    height, width = largest_image_size(processor, plan)
    assert hf_tokens(model_dir, width, height) == 256 and height * width <= 4096 * 4096


def test_size_object_limits_and_the_context_cap(model_dir):
    sized = encoder_plan(make_config(model_dir, max_model_len=2048, limit_mm_per_prompt={
        "image": {"count": 2, "width": 280, "height": 196}, "video": 0}))
    assert sized.item_size == (196, 280, 1) and sized.max_tokens_per_item == hf_tokens(model_dir, 280, 196) == 70
    # Videos of up to 768 frames: far more rows than the context holds -> capped at max_model_len.
    video = encoder_plan(make_config(model_dir, max_model_len=512, max_num_batched_tokens=256))
    assert video.modality == "video" and video.max_tokens_per_item == 512
    assert video.cache_size == 512 and video.num_items_per_step == 1
    explicit = encoder_plan(make_config(model_dir, max_model_len=512, encoder_cache_size=2048))
    assert explicit.cache_size == 2048 and explicit.num_items_per_step == 4


def test_kv_budget_arithmetic_and_the_plan_names_the_tower():
    gib = 1 << 30
    # 80 GiB at 0.9 = 72 GiB, less a 10 GiB peak (weights, LM step, tower), 1 GiB outside torch, 2 GiB cache.
    assert kv_cache_budget(80 * gib, 0.9, 10 * gib, 1 * gib, 2 * gib) == int(72 * gib) - 13 * gib
    assert kv_cache_budget(80 * gib, 0.9, 10 * gib, -5, 0) == int(72 * gib) - 10 * gib   # negative: ignored
    plan = MemoryPlan(num_blocks=100, bytes_per_block=gib // 100, weights_bytes=6 * gib,
                      peak_activation_bytes=3 * gib, tower_peak_bytes=gib, encoder_cache_bytes=gib // 2)
    text = plan.describe(block_size=16, max_model_len=800)
    assert "1600 tokens" in text and "2.00x requests" in text
    assert "vision tower: peak 1.00 GiB on its largest media batch, encoder cache 0.50 GiB" in text
    assert "vision" not in MemoryPlan(num_blocks=1, bytes_per_block=1).describe(16, 16)


def test_tower_profile_encodes_the_largest_batch(model_dir):
    from engine.runner.model_runner import ModelRunner

    config = make_config(model_dir, max_model_len=1024, max_num_batched_tokens=512,
                         limit_mm_per_prompt={"image": 2, "video": 0}, num_gpu_blocks_override=16)
    runner = ModelRunner(config)
    plan = encoder_plan(config)
    calls = []
    runner.model.embed_multimodal = (lambda original: lambda pixels, grid: calls.append(grid.tolist())
                                     or original(pixels, grid))(runner.model.embed_multimodal)
    assert runner._profile_run(plan) == 0   # no CUDA: nothing measured, but the tower ran
    assert len(calls) == 1 and len(calls[0]) == plan.num_items_per_step == 2
    assert all(t * h * w // 4 == 256 for t, h, w in calls[0])
    assert runner.encoder_runner.embeddings == {} and runner.kv_caches == []
