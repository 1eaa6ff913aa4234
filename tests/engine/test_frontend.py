"""engine.frontend: tokenisation against the HF tokenizer (the oracle), vLLM's length rules with
hand-computed numbers, media-count limits, seeds, and chat rendering against apply_chat_template."""

import dataclasses

import pytest
from PIL import Image
from transformers import AutoConfig

from engine.config import MultiModalConfig
from engine.config_loader import create_engine_config
from engine.frontend import Frontend, MediaInput
from engine.sampling_params import SamplingParams

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def frontend(tiny_model_dir):
    return Frontend(create_engine_config(model=str(tiny_model_dir("qwen2")), max_model_len=MAX_MODEL_LEN))


@pytest.fixture(scope="module")
def vl_frontend(tiny_model_dir, frontend):
    """The qwen2_vl checkpoint's config with an image limit of 1 (media counts are checked before
    any processing, so no processor is involved)."""
    path = str(tiny_model_dir("qwen2_vl"))
    model_config = dataclasses.replace(frontend.config.model_config, path=path, hf_config=AutoConfig.from_pretrained(path),
                                       architecture="Qwen2VLForConditionalGeneration")
    config = frontend.config.replace(model_config=model_config,
                                     multimodal_config=MultiModalConfig(limit_per_prompt={"image": 1, "video": 0}))
    return Frontend(config)


def test_text_prompt_is_tokenized_like_hf_and_completed(frontend):
    prompt = "Hello world, 你好 🙂"
    request = frontend.make_request("r1", prompt, [], SamplingParams(max_tokens=None, temperature=0.7))
    expected_ids = frontend.tokenizer.encode(prompt)
    assert request.prompt_token_ids == expected_ids and request.req_id == "r1"
    assert request.sampling_params.max_tokens == MAX_MODEL_LEN - len(expected_ids)
    assert request.sampling_params.seed is not None and request.sampling_params.temperature == 0.7
    assert request.mm_items == [] and request.arrival_time > 0
    other = frontend.make_request("r2", prompt, [], SamplingParams())
    assert other.sampling_params.seed != request.sampling_params.seed
    assert frontend.make_request("r3", prompt, [], SamplingParams(seed=5)).sampling_params.seed == 5


def test_token_id_prompts(frontend):
    assert frontend.make_request("r", [1, 2, 3], [], SamplingParams()).prompt_token_ids == [1, 2, 3]
    with pytest.raises(ValueError, match=f"token id {frontend.vocab_size} is out of vocabulary"):
        frontend.make_request("r", [1, frontend.vocab_size], [], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        frontend.make_request("r", [], [], SamplingParams())


def test_prompt_must_leave_room_for_one_token(frontend):
    frontend.make_request("ok", list(range(MAX_MODEL_LEN - 1)), [], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=f"length {MAX_MODEL_LEN}\\).*maximum model length of {MAX_MODEL_LEN}"):
        frontend.make_request("r", list(range(MAX_MODEL_LEN)), [], SamplingParams(max_tokens=None))


def test_prompt_plus_max_tokens_beyond_max_model_len(frontend):
    with pytest.raises(ValueError, match=r"requested 65 tokens \(40 in the messages, 25 in the completion\)"):
        frontend.make_request("r", list(range(40)), [], SamplingParams(max_tokens=25))
    assert frontend.make_request("r", list(range(40)), [], SamplingParams(max_tokens=24)).sampling_params.max_tokens == 24


@pytest.mark.parametrize("params, field", [
    (SamplingParams(max_tokens=0), "max_tokens"), (SamplingParams(temperature=-0.5), "temperature"),
    (SamplingParams(top_p=0.0), "top_p"), (SamplingParams(top_p=1.5), "top_p"), (SamplingParams(n=0), "n")])
def test_bad_sampling_params(frontend, params, field):
    with pytest.raises(ValueError, match=field):
        frontend.make_request("r", "hi", [], params)


def test_text_only_model_refuses_media(frontend):
    with pytest.raises(ValueError, match="text-only.*image"):
        frontend.make_request("r", "hi", [MediaInput("image", Image.new("RGB", (28, 28)))], SamplingParams())


def test_media_counts_are_checked_against_the_limits(vl_frontend):
    images = [MediaInput("image", Image.new("RGB", (28, 28))) for _ in range(2)]
    with pytest.raises(ValueError, match="At most 1 image.*got 2.*image=1"):
        vl_frontend.make_request("r", "hi", images, SamplingParams())
    with pytest.raises(ValueError, match="At most 0 video"):
        vl_frontend.make_request("r", "hi", [MediaInput("video", [Image.new("RGB", (28, 28))] * 2)], SamplingParams())


def test_render_chat_uses_the_model_template(frontend):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    rendered = frontend.render_chat(messages)
    assert rendered.prompt == frontend.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.media == []
    inline = frontend.render_chat(messages, chat_template="{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert inline.prompt == "[Be brief.][Hi!]"


def test_image_and_video_placeholders_expand_like_the_hf_processor(tiny_model_dir):
    from transformers import AutoProcessor

    path = str(tiny_model_dir("qwen2_vl"))
    frontend = Frontend(create_engine_config(model=path, dtype="float32", max_model_len=4096))
    hf_processor = AutoProcessor.from_pretrained(path)
    image = Image.new("RGB", (90, 60), (200, 30, 10))
    video = [Image.new("RGB", (56, 84), (i * 40, 0, 0)) for i in range(4)]
    rendered = frontend.render_chat([{"role": "user", "content": [
        {"type": "video", "video": video}, {"type": "text", "text": "and"},
        {"type": "image_pil", "image_pil": image}]}])
    media = [MediaInput(ref.modality, ref.data) for ref in rendered.media]
    request = frontend.make_request("vl", rendered.prompt, media, SamplingParams(), add_special_tokens=False)
    expected = hf_processor(text=[rendered.prompt], images=[image], videos=[video], return_tensors="pt",
                            videos_kwargs={"do_sample_frames": False})
    assert request.prompt_token_ids == expected["input_ids"][0].tolist()
    video_item, image_item = request.mm_items
    ids = request.prompt_token_ids
    for item, token_id, grid in ((video_item, frontend.config.model_config.hf_config.video_token_id,
                                  expected["video_grid_thw"][0]),
                                 (image_item, frontend.config.model_config.hf_config.image_token_id,
                                  expected["image_grid_thw"][0])):
        start, length = item.placeholder.offset, item.placeholder.length
        assert ids[start:start + length] == [token_id] * length and ids.count(token_id) == length
        assert item.grid_thw == tuple(grid.tolist())
    assert video_item.placeholder.offset < image_item.placeholder.offset
