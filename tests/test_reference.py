"""Checks the HF oracle (tests/reference.py) against an independent path: one full forward pass without a
KV cache over prompt + generated tokens must reproduce every greedy choice and top-k logprob."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reference import RefRequest, RefVideo, hf_generate, hf_prompt_logprobs, load, prepare_inputs

MAX_NEW_TOKENS = 6


def pattern_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_messages(image: Image.Image, text: str = "Describe this image.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


@torch.inference_mode()
def full_forward_logprobs(model_dir, request, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits predicting each generated token, from one uncached forward pass."""
    inputs = prepare_inputs(model_dir, request)
    num_prompt = inputs["input_ids"].shape[1]
    extra = torch.tensor([token_ids[:-1]], dtype=torch.long)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)  # [1, prompt + generated - 1]
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            inputs[key] = torch.cat([inputs[key], torch.zeros_like(extra)], dim=1)
    logits = load(str(model_dir)).model(**inputs, use_cache=False).logits[0]  # [total, vocab]
    return torch.log_softmax(logits[num_prompt - 1:].float(), dim=-1)  # [generated, vocab]


def assert_matches_full_forward(model_dir, request, output) -> None:
    logprobs = full_forward_logprobs(model_dir, request, output.token_ids)
    assert logprobs.argmax(dim=-1).tolist() == output.token_ids
    for step, top in enumerate(output.top_logprobs):
        ids = list(top)
        torch.testing.assert_close(logprobs[step, ids], torch.tensor(list(top.values())), atol=1e-4, rtol=0)
        assert ids == logprobs[step].topk(len(ids)).indices.tolist()


@pytest.mark.parametrize("request_kind", ["token_ids", "text", "chat_with_tools"])
def test_text_generation_matches_uncached_forward(tiny_model_dir, request_kind):
    model_dir = tiny_model_dir("qwen2")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    request = {
        "token_ids": [5, 17, 300, 42, 9],
        "text": "The quick brown fox",
        "chat_with_tools": RefRequest(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools),
    }[request_kind]
    [output] = hf_generate(model_dir, [request], MAX_NEW_TOKENS, top_k=4)
    assert len(output.token_ids) == MAX_NEW_TOKENS == len(output.top_logprobs)
    assert output.finish_reason == "length"
    assert_matches_full_forward(model_dir, request, output)
    if request_kind == "chat_with_tools":
        assert "<tools>" in load(str(model_dir)).tokenizer.decode(output.prompt_token_ids)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_image_generation_matches_uncached_forward_and_sees_the_image(tiny_model_dir, name):
    model_dir = tiny_model_dir(name)
    # 250x180 -> 18x13 patches: several 112-px windows, so Qwen2.5-VL's window attention really partitions
    requests = [image_messages(pattern_image(250, 180, 0)), image_messages(pattern_image(250, 180, 1))]
    outputs = hf_generate(model_dir, requests, MAX_NEW_TOKENS)
    assert outputs[0].prompt_token_ids == outputs[1].prompt_token_ids  # same size: same placeholders
    assert outputs[0].token_ids != outputs[1].token_ids  # greedy continuation depends on the pixels
    assert_matches_full_forward(model_dir, requests[0], outputs[0])


def test_video_frames_are_not_resampled_and_fps_sets_grid_seconds(tiny_model_dir):
    model_dir = tiny_model_dir("qwen2_5_vl")
    rng = np.random.default_rng(3)
    video = RefVideo(rng.integers(0, 256, (6, 56, 84, 3), dtype=np.uint8), fps=3.0)
    request = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "Go"}]}]
    inputs = prepare_inputs(model_dir, request)
    assert inputs["video_grid_thw"][0, 0].item() == 6 // 2  # temporal patch 2, no frame sampling
    torch.testing.assert_close(inputs["second_per_grid_ts"], torch.tensor([2 / 3.0]))
    [output] = hf_generate(model_dir, [request], 3)
    assert_matches_full_forward(model_dir, request, output)


def test_pre_rendered_prompt_with_image_equals_chat_rendering(tiny_model_dir):
    model_dir = tiny_model_dir("qwen2_vl")
    image = pattern_image(60, 90, 4)
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n")
    rendered = prepare_inputs(model_dir, RefRequest(prompt=prompt, images=(image,)))
    from_chat = prepare_inputs(model_dir, image_messages(image))
    assert rendered["input_ids"].tolist() == from_chat["input_ids"].tolist()
    torch.testing.assert_close(rendered["pixel_values"], from_chat["pixel_values"], atol=0, rtol=0)


def test_prompt_logprobs_continue_the_generation_logprobs(tiny_model_dir):
    model_dir = tiny_model_dir("qwen2")
    prompt = [11, 250, 7, 99, 500, 3]
    [output] = hf_generate(model_dir, [prompt], 3, top_k=3)
    [per_position] = hf_prompt_logprobs(model_dir, [prompt + output.token_ids], top_k=3)
    assert per_position[0] is None and len(per_position) == len(prompt) + 3
    for step, top in enumerate(output.top_logprobs):
        entry = per_position[len(prompt) + step]  # predicts generated token `step`, uncached this time
        assert list(entry)[:3] == list(top) and output.token_ids[step] in entry
        for token_id, logprob in top.items():
            assert abs(entry[token_id] - logprob) < 1e-4


def test_image_prompt_logprobs_are_causal_in_the_image(tiny_model_dir):
    model_dir = tiny_model_dir("qwen2_5_vl")
    requests = [image_messages(pattern_image(64, 64, 2)), image_messages(pattern_image(64, 64, 3))]
    with_first, with_second = hf_prompt_logprobs(model_dir, requests, top_k=3)
    prompt_ids = prepare_inputs(model_dir, requests[0])["input_ids"][0].tolist()
    vision_start = prompt_ids.index(load(str(model_dir)).model.config.vision_start_token_id)
    [text_prefix] = hf_prompt_logprobs(model_dir, [prompt_ids[: vision_start + 1]], top_k=3)
    assert len(with_first) == len(prompt_ids) and with_first[0] is None
    for position in range(1, vision_start + 1):  # before the image: the pixels cannot matter
        assert with_first[position].keys() == text_prefix[position].keys()
        for token_id, logprob in text_prefix[position].items():
            assert abs(with_first[position][token_id] - logprob) < 1e-4
    assert with_first[-1] != with_second[-1]  # after it, they do


def test_stop_token_ids_end_the_run_on_first_occurrence(tiny_model_dir):
    model_dir = tiny_model_dir("qwen2")
    prompt = "Once upon a time"
    [free_run] = hf_generate(model_dir, [prompt], 12, ignore_eos=True)
    stop_id = free_run.token_ids[4]
    first = free_run.token_ids.index(stop_id)
    [stopped] = hf_generate(model_dir, [prompt], 12, ignore_eos=True, stop_token_ids=[stop_id])
    assert stopped.token_ids == free_run.token_ids[: first + 1]
    assert stopped.finish_reason == "stop" and len(stopped.top_logprobs) == first + 1
    assert free_run.finish_reason == "length"
