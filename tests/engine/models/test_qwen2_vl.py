"""Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration against transformers, float32:
weights from both checkpoint layouts (the hub's visual.* / model.layers.* and transformers 5's
model.visual.* / model.language_model.*), checked loading, per-item vision embeddings, and full-prompt
logits for an image + video prompt (vision rows merged, M-RoPE positions incl. video time scaling), within
a multiple of transformers' own float32 rounding error measured against its float64 result."""

import copy

import pytest
import torch

from engine.layers.attention import AttentionMetadata
from engine.models import get_model_class
from engine.weights import iterate_weights, load_checked
from reference import RefRequest, RefVideo, load, prepare_inputs
from vision.inputs import IMAGE, VIDEO, MultiModalItem, PlaceholderRange

BLOCK_SIZE = 16
VIDEO_FPS = 1.5   # second_per_grid_t = 4/3: Qwen2.5-VL temporal steps of 8/3 positions, truncated: 0, 2, 5
MODELS = ["qwen2_5_vl", "qwen2_vl"]
ARCHITECTURES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}


@pytest.fixture(scope="module", params=MODELS)
def setup(request, tiny_model_dir):
    model_dir = str(tiny_model_dir(request.param))
    hf = load(model_dir).model
    model_class = get_model_class(ARCHITECTURES[request.param])
    ours = model_class(hf.config).float().eval()
    load_checked(ours, iterate_weights(model_dir))   # the hub layout, as saved on disk
    return model_dir, hf, ours, model_class


def test_both_checkpoint_layouts_load_the_same_parameters(setup):
    model_dir, hf, ours, model_class = setup
    state_dict = hf.state_dict()
    assert any(name.startswith("model.language_model.") for name in state_dict)  # transformers 5 layout
    assert not any(name.startswith("model.language_model.") for name, _ in iterate_weights(model_dir))
    other = model_class(hf.config).float()
    load_checked(other, state_dict.items())
    for (name, ours_param), (_, other_param) in zip(ours.named_parameters(), other.named_parameters()):
        assert torch.equal(ours_param, other_param), name
    tied = hf.config.tie_word_embeddings
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    torch.testing.assert_close(ours.lm_head.weight, hf.lm_head.weight, rtol=0, atol=0)


def test_missing_and_unexpected_weights_fail(setup):
    model_dir, hf, _, model_class = setup
    weights = dict(iterate_weights(model_dir))
    missing = {k: v for k, v in weights.items() if k != "visual.blocks.0.norm1.weight"}
    with pytest.raises(ValueError, match="missing .*visual.blocks.0.norm1.weight"):
        load_checked(model_class(hf.config).float(), missing.items())
    no_k = {k: v for k, v in weights.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match="missing .*layers.1.self_attn.qkv_proj.weight#k"):
        load_checked(model_class(hf.config).float(), no_k.items())
    for extra in ("visual.blocks.0.extra.weight", "model.layers.0.mlp.extra.weight", "vision_tower.x"):
        with pytest.raises(ValueError, match="extra|vision_tower"):
            load_checked(model_class(hf.config).float(), [*weights.items(), (extra, torch.zeros(2))])


def image(width, height, seed):
    from PIL import Image

    rng = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=rng, dtype=torch.uint8).numpy())


@pytest.fixture(scope="module")
def mixed_inputs(setup):
    """An image, text, a 6-frame video at fps 1.5 (non-integer temporal steps for Qwen2.5-VL), text."""
    model_dir = setup[0]
    video = torch.randint(0, 256, (6, 42, 56, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    prompt = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>A picture, then a video: "
              "<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n<|im_start|>assistant\n")
    request = RefRequest(prompt=prompt, images=(image(90, 60, 1),), videos=(RefVideo(video.numpy(), VIDEO_FPS),))
    return prepare_inputs(model_dir, request)


def placeholder_items(inputs, config) -> list[MultiModalItem]:
    ids = inputs["input_ids"][0].tolist()
    grids = {IMAGE: inputs["image_grid_thw"].tolist(), VIDEO: inputs["video_grid_thw"].tolist()}
    # Qwen2-VL's processor gives no second_per_grid_ts; the item still carries it (M-RoPE must ignore it).
    seconds = {IMAGE: [0.0], VIDEO: [2 / VIDEO_FPS]}
    pad_of = {IMAGE: config.image_token_id, VIDEO: config.video_token_id}
    items = []
    for modality in (IMAGE, VIDEO):
        offset = ids.index(pad_of[modality])
        length = ids.count(pad_of[modality])
        items.append(MultiModalItem(modality, modality, PlaceholderRange(offset, length), b"", (0, 0, 0, 0),
                                    tuple(grids[modality][0]), seconds[modality][0]))
    return sorted(items, key=lambda item: item.placeholder.offset)


def single_request_metadata(num_tokens: int) -> AttentionMetadata:
    blocks = list(range(1, -(-num_tokens // BLOCK_SIZE) + 1))
    return AttentionMetadata(
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32), slot_mapping=torch.arange(BLOCK_SIZE, BLOCK_SIZE + num_tokens),
        block_tables=torch.tensor([blocks], dtype=torch.int32), max_query_len=num_tokens, max_seq_len=num_tokens,
        num_reqs=1, num_actual_tokens=num_tokens, query_lens_cpu=[num_tokens], seq_lens_cpu=[num_tokens])


# Our float32 logits may be off the float64 result by at most this multiple of transformers' own float32
# error on the same prompt (measured: 1.7e-4 of logits reaching 9.5 on the tiny Qwen2.5-VL, i.e. ~140
# float32 ulps of the logits' scale; ours 5e-5). A fixed atol would test the library version's rounding,
# not our model: 1e-4 fails on transformers 5.24 and would on 5.23 too without its rtol term.
NOISE_MULTIPLE = 4


def float64_logits(hf, inputs) -> torch.Tensor:
    """transformers' logits in float64: the reference against which float32 rounding is measured."""
    hf64 = copy.deepcopy(hf).double()
    inputs64 = {key: value.double() if torch.is_floating_point(value) else value for key, value in inputs.items()}
    return hf64(**inputs64).logits[0].double()


@torch.no_grad()
def test_image_and_video_prompt_logits_match_transformers(setup, mixed_inputs):
    _, hf, ours, _ = setup
    inputs = mixed_inputs
    image_embeds = ours.embed_multimodal(inputs["pixel_values"], inputs["image_grid_thw"])
    video_embeds = ours.embed_multimodal(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    hf_image = hf.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    torch.testing.assert_close(image_embeds[0], hf_image[0], atol=1e-4, rtol=1e-4)
    input_ids = inputs["input_ids"][0]
    embeds = ours.embed_input_ids(input_ids)                        # [L, H]
    items = placeholder_items(inputs, hf.config)
    for item in items:
        rows = (image_embeds if item.modality == IMAGE else video_embeds)[0]
        embeds[item.placeholder.offset:item.placeholder.offset + item.placeholder.length] = rows
    positions, delta = ours.get_mrope_positions(input_ids.tolist(), items)
    text = hf.config.get_text_config()
    num_blocks = -(-len(input_ids) // BLOCK_SIZE) + 1
    shape = (num_blocks, BLOCK_SIZE, text.num_key_value_heads, text.hidden_size // text.num_attention_heads)
    kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(text.num_hidden_layers)]
    hidden = ours(None, positions, single_request_metadata(len(input_ids)), kv_caches, inputs_embeds=embeds)
    exact = float64_logits(hf, inputs)                             # [L, vocab]
    noise = (hf(**inputs).logits[0].double() - exact).abs().max().item()
    assert 0 < noise < 1e-4 * exact.abs().max().item()                # rounding, not a float64 failure
    error = (ours.compute_logits(hidden).double() - exact).abs().max().item()
    assert error <= NOISE_MULTIPLE * noise, f"{error:.3g} from float64; transformers' float32 is {noise:.3g} off"
    hf_positions, hf_delta = hf.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"],
        **({"second_per_grid_ts": inputs["second_per_grid_ts"]} if "Qwen2_5" in type(hf).__name__ else {}))
    assert torch.equal(positions, hf_positions[:, 0]) and delta == int(hf_delta)
