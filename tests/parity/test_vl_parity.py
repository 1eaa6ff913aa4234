"""Issue 5 acceptance for images and videos: engine.LLM against transformers (tests/reference.py), on
the tiny Qwen2.5-VL and Qwen2-VL checkpoints, float32 on the CPU.

Seven prompts (one image; three images of different sizes and aspect ratios; text between images;
a long text after an image; a video; a video and an image; text only) submitted together must give
greedy tokens identical to transformers' and top-5 logprobs within 1e-4, under: defaults (every
item encoded in one tower call); chunked prefill with max_num_batched_tokens=32 (chunks cut through
placeholders); a KV cache too small for all of them (preemption); prefix caching with every prompt
sent twice (hits counted). After every run all KV blocks are free. Also: one image in 8 concurrent
requests is encoded once; the same text with another image shares no blocks; LLM.chat with a data:
image URL and a file:// video; a request with broken media fails alone.
"""

import base64
import io

import msgspec
import numpy as np
import pytest
from PIL import Image

from engine import LLM, SamplingParams
from engine.protocol import FinishReason
from reference import RefRequest, RefVideo, hf_generate
from vision.image import decode_image
from vision.video import decode_video, video_from_frames

MODELS = ["qwen2_5_vl", "qwen2_vl"]
NUM_NEW_TOKENS = 8
TOP_K = 5
LOGPROB_ATOL = 1e-4
MAX_MODEL_LEN = 1024
BLOCK_SIZE = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=TOP_K)
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
LONG_TEXT = " ".join(["Serving engines batch many requests together, schedule prefill and decode, and "
                      "stream tokens back."] * 8)


def chat(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def pattern_image(width: int, height: int, seed: int) -> Image.Image:
    """A gradient with noise: structure the tower can see, different per seed."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 // max(1, width - 1), ys * 255 // max(1, height - 1),
                     (xs + ys) * 255 // max(1, width + height - 2)], axis=-1)
    noise = rng.integers(-40, 40, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def pattern_video(num_frames: int, width: int, height: int, seed: int) -> np.ndarray:
    frames = [np.asarray(pattern_image(width, height, seed + i)) for i in range(num_frames)]
    return np.stack(frames)  # [T, H, W, 3] uint8


@pytest.fixture(scope="module")
def cases():
    return make_cases()


def make_cases() -> dict:
    """name -> (prompt text, images, videos as (frames, fps)); media in prompt order. Also used by
    bench/check_vl_gpu.py."""
    video_a = pattern_video(4, 56, 40, seed=20)   # a bare array: 24 fps, as transformers (no metadata either side)
    video_b = pattern_video(6, 42, 42, seed=30)   # VideoFrames at fps 1.5: 2.5-VL time steps of 8/3 -> 0, 2, 5
    one_image = pattern_image(112, 84, 1)
    return {
        "one_image": (chat(f"{IMG}Describe this image."), [one_image], []),
        "three_images": (chat(f"{IMG}{IMG}{IMG}Compare them."),
                         [pattern_image(200, 60, 2), pattern_image(60, 140, 3), pattern_image(90, 90, 4)], []),
        "text_between_images": (chat(f"{IMG}The cat sat on the mat.{IMG}Which one is brighter?"),
                                [pattern_image(70, 100, 5), pattern_image(130, 56, 6)], []),
        # The same image as one_image: the batch encodes it once (both share an mm_hash).
        "long_text_after_image": (chat(f"{IMG}{LONG_TEXT}"), [one_image], []),
        "video": (chat(f"{VID}What is in the video?"), [], [(video_a, None)]),
        "video_then_image": (chat(f"{VID}Now this picture: {IMG}Describe both."),
                             [pattern_image(98, 70, 8)], [(video_b, 1.5)]),
        "text_only": (chat("Please answer the question briefly."), [], []),
    }


def engine_prompt(case) -> dict:
    text, images, videos = case
    data = {}
    if images:
        data["image"] = images
    if videos:
        data["video"] = [frames if fps is None else video_from_frames(frames, fps) for frames, fps in videos]
    return {"prompt": text, "multi_modal_data": data} if data else {"prompt": text}


def ref_request(case) -> RefRequest:
    text, images, videos = case
    return RefRequest(prompt=text, images=tuple(images),
                      videos=tuple(RefVideo(frames, fps) for frames, fps in videos))


@pytest.fixture(scope="module", params=MODELS)
def model_dir(request, tiny_model_dir):
    return str(tiny_model_dir(request.param))


@pytest.fixture(scope="module")
def reference(model_dir, cases):
    """transformers' outputs for every case, computed once per model."""
    outputs = hf_generate(model_dir, [ref_request(case) for case in cases.values()], NUM_NEW_TOKENS,
                          top_k=TOP_K, ignore_eos=True)
    return dict(zip(cases, outputs))


def make_llm(model_dir, **kwargs) -> LLM:
    # An explicit block count: the CPU default (4 GiB of KV cache) takes seconds to allocate.
    kwargs = {"enable_prefix_caching": False, "max_num_seqs": 32, "num_gpu_blocks_override": 400, **kwargs}
    return LLM(model_dir, dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE,
               **kwargs)


def assert_matches(output, ref) -> float:
    """Greedy tokens identical, every HF top-5 logprob within LOGPROB_ATOL; returns the max error."""
    completion = output.outputs[0]
    assert output.prompt_token_ids == ref.prompt_token_ids
    assert completion.token_ids == ref.token_ids
    max_error = 0.0
    for ours, theirs in zip(completion.logprobs, ref.top_logprobs, strict=True):
        for token_id, logprob in theirs.items():
            max_error = max(max_error, abs(ours[token_id].logprob - logprob))
    assert max_error <= LOGPROB_ATOL
    return max_error


def run_all(llm, cases, reference, copies: int = 1):
    names = list(cases) * copies
    outputs = llm.generate([engine_prompt(cases[name]) for name in names], GREEDY, use_tqdm=False)
    max_error = max(assert_matches(output, reference[name]) for output, name in zip(outputs, names))
    stats = llm.client.stats()
    assert stats.num_free_blocks == stats.num_total_blocks  # every block is back
    return outputs, stats, max_error


def num_distinct_items(cases) -> int:
    return len({id(item) for _, images, videos in cases.values() for item in images + [v for v, _ in videos]})


def encoder_counts(llm) -> tuple[int, int]:
    encoder = llm.client.core.runner.encoder_runner
    return encoder.num_tower_calls, encoder.num_encoded_items


def test_batch_of_all_cases_in_one_tower_call(model_dir, cases, reference):
    llm = make_llm(model_dir)
    _, stats, max_error = run_all(llm, cases, reference)
    assert encoder_counts(llm) == (1, num_distinct_items(cases))  # all in the first step: one call
    print(f"defaults: max |logprob error| {max_error:.2e}")


def test_chunked_prefill_cuts_through_placeholders(model_dir, cases, reference):
    llm = make_llm(model_dir, max_num_batched_tokens=32)
    _, _, max_error = run_all(llm, cases, reference)
    assert encoder_counts(llm)[1] == num_distinct_items(cases)  # once each, sliced across chunks
    print(f"chunked (32 tokens/step): max |logprob error| {max_error:.2e}")


def test_scarce_kv_cache_preempts_and_recomputes(model_dir, cases, reference):
    longest = max(len(ref.prompt_token_ids) for ref in reference.values()) + NUM_NEW_TOKENS
    num_blocks = -(-longest // BLOCK_SIZE) + 2   # the longest request alone, plus the null block
    llm = make_llm(model_dir, num_gpu_blocks_override=num_blocks)
    _, stats, max_error = run_all(llm, cases, reference)
    assert stats.num_preemptions > 0
    print(f"scarce KV ({num_blocks} blocks, {stats.num_preemptions} preemptions): "
          f"max |logprob error| {max_error:.2e}")


def test_prefix_caching_with_every_prompt_twice(model_dir, cases, reference):
    llm = make_llm(model_dir, enable_prefix_caching=True)
    outputs, stats, max_error = run_all(llm, cases, reference, copies=2)
    twins = outputs[len(cases):]
    for twin in twins:  # a twin hits every full block of its first copy but the last token's
        assert twin.num_cached_tokens == (len(twin.prompt_token_ids) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert stats.prefix_cache_hits >= sum(twin.num_cached_tokens for twin in twins) > 0
    print(f"prefix caching x2: hits {stats.prefix_cache_hits}/{stats.prefix_cache_queries}, "
          f"max |logprob error| {max_error:.2e}")


def test_one_image_in_eight_requests_is_encoded_once(model_dir, cases, reference):
    llm = make_llm(model_dir, max_num_batched_tokens=64)
    names = ["one_image", "long_text_after_image"] * 4   # two texts, one image
    outputs = llm.generate([engine_prompt(cases[name]) for name in names], GREEDY, use_tqdm=False)
    for output, name in zip(outputs, names):
        assert_matches(output, reference[name])
    assert encoder_counts(llm) == (1, 1)


def test_image_prompts_built_on_threads_while_the_engine_steps(model_dir, cases, reference, monkeypatch):
    """Three build threads and a 64-token step budget: the engine steps on the first prompts while
    the rest are resized and hashed; results come back in input order, each equal to transformers'.
    Then a prompt whose placeholders do not match its images, in the middle, raises the ValueError
    it raises alone and leaves no request and no KV block behind."""
    monkeypatch.setattr("engine.llm.num_build_workers", lambda num_prompts: min(num_prompts, 3))
    llm = make_llm(model_dir, max_num_batched_tokens=64)
    names = list(reversed(cases)) + list(cases)
    outputs = llm.generate([engine_prompt(cases[name]) for name in names], GREEDY, use_tqdm=False)
    for output, name in zip(outputs, names, strict=True):
        assert_matches(output, reference[name])
    text, images, _ = cases["one_image"]
    bad = {"prompt": text.replace(IMG, IMG + IMG), "multi_modal_data": {"image": images}}
    with pytest.raises(ValueError) as alone:
        llm.generate(bad, GREEDY, use_tqdm=False)
    prompts = [engine_prompt(cases[name]) for name in names]
    with pytest.raises(ValueError) as threaded:
        llm.generate(prompts[:5] + [bad] + prompts[5:], GREEDY, use_tqdm=False)
    assert str(threaded.value) == str(alone.value) and "placeholders" in str(alone.value)
    stats = llm.client.stats()
    assert not llm.client.has_unfinished_requests() and stats.num_free_blocks == stats.num_total_blocks


def test_same_text_with_another_image_shares_no_blocks(model_dir, cases, reference):
    llm = make_llm(model_dir, enable_prefix_caching=True)
    text, images, _ = cases["long_text_after_image"]
    other = pattern_image(*images[0].size, seed=99)   # same size: the very same token ids
    first = llm.generate({"prompt": text, "multi_modal_data": {"image": images[0]}}, GREEDY, use_tqdm=False)[0]
    second = llm.generate({"prompt": text, "multi_modal_data": {"image": other}}, GREEDY, use_tqdm=False)[0]
    assert second.prompt_token_ids == first.prompt_token_ids
    image_offset = first.prompt_token_ids.index(llm.config.model_config.hf_config.image_token_id)
    assert second.num_cached_tokens <= image_offset // BLOCK_SIZE * BLOCK_SIZE
    [other_ref] = hf_generate(model_dir, [RefRequest(prompt=text, images=(other,))], NUM_NEW_TOKENS,
                              top_k=TOP_K, ignore_eos=True)
    assert_matches(second, other_ref)
    again = llm.generate({"prompt": text, "multi_modal_data": {"image": images[0]}}, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens > image_offset   # the same image does hit (the check above can fail)
    assert_matches(again, reference["long_text_after_image"])


def test_chat_with_image_data_url_and_file_video(model_dir, media_dir):
    llm = make_llm(model_dir, allowed_local_media_path=str(media_dir))
    image = pattern_image(77, 63, seed=11)
    png = io.BytesIO()
    image.save(png, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    video_path = media_dir / "lossless.mov"
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "video_url", "video_url": {"url": f"file://{video_path}"}},
        {"type": "text", "text": "What happens?"}]}]
    output = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    video = decode_video(video_path.read_bytes())
    ref_messages = [{"role": "user", "content": [
        {"type": "image", "image": decode_image(png.getvalue())},
        {"type": "video", "video": RefVideo(video.frames, video.fps)},
        {"type": "text", "text": "What happens?"}]}]
    [ref] = hf_generate(model_dir, [ref_messages], NUM_NEW_TOKENS, top_k=TOP_K, ignore_eos=True)
    assert_matches(output, ref)


def test_broken_media_fails_only_its_request(model_dir, cases, reference):
    llm = make_llm(model_dir)
    text, images, _ = cases["one_image"]
    good = llm.frontend.make_request("good", text, _media(images), GREEDY)
    bad = llm.frontend.make_request("bad", cases["three_images"][0], _media(cases["three_images"][1]), GREEDY)
    broken = msgspec.structs.replace(bad.mm_items[1], frames=bad.mm_items[1].frames[:-7])  # truncated
    bad = msgspec.structs.replace(bad, mm_items=[bad.mm_items[0], broken, bad.mm_items[2]])
    item = good.mm_items[0]   # a grid that disagrees with its placeholder and frames
    bad_grid = msgspec.structs.replace(good, req_id="bad_grid", mm_items=[msgspec.structs.replace(
        item, mm_hash="other", grid_thw=(1, item.grid_thw[1], item.grid_thw[2] + 2))])
    outputs = _run_engine(llm, [bad, bad_grid, good])
    assert outputs["bad"][-1].finish_reason == FinishReason.ERROR
    assert "image" in outputs["bad"][-1].error and "bytes" in outputs["bad"][-1].error
    assert outputs["bad_grid"][-1].finish_reason == FinishReason.ERROR and "grid" in outputs["bad_grid"][-1].error
    good_tokens = [t for out in outputs["good"] for t in out.new_token_ids]
    assert good_tokens == reference["one_image"].token_ids
    stats = llm.client.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def _media(images):
    from engine.frontend import MediaInput

    return [MediaInput("image", image) for image in images]


def _run_engine(llm, requests) -> dict:
    """Submit EngineRequests to the core directly; returns req_id -> its EngineOutputs."""
    for request in requests:
        llm.client.add_request(request)
    outputs = {request.req_id: [] for request in requests}
    for _ in range(100):
        if not llm.client.has_unfinished_requests():
            return outputs
        for output in llm.client.step().outputs:
            outputs[output.req_id].append(output)
    raise AssertionError("the engine did not finish the requests in 100 steps")
