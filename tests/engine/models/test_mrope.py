"""M-RoPE positions against transformers' get_rope_index (Qwen2-VL and Qwen2.5-VL)."""

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

from engine.models.mrope import mrope_positions
from vision.inputs import IMAGE, VIDEO, MultiModalItem, PlaceholderRange

IMG, VID, TXT = 7, 8, 3
TINY_TEXT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=16, vocab_size=32, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})


def _hf_model(cls, config_cls, tokens_per_second):
    vision = dict(depth=1, hidden_size=8, embed_dim=8, num_heads=1, out_hidden_size=16, intermediate_size=8,
                  spatial_merge_size=2, tokens_per_second=tokens_per_second)
    config = config_cls(text_config=TINY_TEXT, vision_config=vision, image_token_id=IMG, video_token_id=VID)
    return cls(config).eval()


def _layout(parts):
    """parts: list of ("text", n) | (modality, (t, h, w), second_per_grid_t) -> ids, items."""
    ids, items = [], []
    for part in parts:
        if part[0] == "text":
            ids += [TXT] * part[1]
            continue
        modality, (t, h, w), spg = part
        length = t * h * w // 4
        items.append(MultiModalItem(modality, f"h{len(items)}", PlaceholderRange(len(ids), length), b"",
                                    (0, 0, 0, 0), (t, h, w), spg))
        ids += [IMG if modality == IMAGE else VID] * length
    return ids, items


CASES = [
    [("text", 5)],
    [("text", 3), (IMAGE, (1, 4, 6), 0.0), ("text", 4)],
    [("text", 2), (IMAGE, (1, 8, 4), 0.0), ("text", 1), (IMAGE, (1, 2, 2), 0.0), ("text", 6)],
    [("text", 2), (VIDEO, (3, 4, 4), 1.0), ("text", 3)],
    [("text", 1), (VIDEO, (4, 2, 6), 0.5), ("text", 2), (IMAGE, (1, 6, 6), 0.0), ("text", 9)],
    [(IMAGE, (1, 4, 4), 0.0), ("text", 2)],
]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("parts", CASES)
def test_positions_match_get_rope_index(family, parts):
    tokens_per_second = 4
    if family == "qwen2_vl":
        model = _hf_model(Qwen2VLModel, Qwen2VLConfig, tokens_per_second)
    else:
        model = _hf_model(Qwen2_5_VLModel, Qwen2_5_VLConfig, tokens_per_second)
    ids, items = _layout(parts)
    input_ids = torch.tensor([ids])
    types = torch.tensor([[1 if i == IMG else 2 if i == VID else 0 for i in ids]])
    grids = {m: [it.grid_thw for it in items if it.modality == m] for m in (IMAGE, VIDEO)}
    kwargs = dict(image_grid_thw=torch.tensor(grids[IMAGE]) if grids[IMAGE] else None,
                  video_grid_thw=torch.tensor(grids[VIDEO]) if grids[VIDEO] else None,
                  mm_token_type_ids=types)
    if family == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = torch.tensor([it.second_per_grid_t for it in items if it.modality == VIDEO])
    expected, expected_delta = model.get_rope_index(input_ids, **kwargs)

    ours, delta = mrope_positions(len(ids), items, 2, tokens_per_second if family == "qwen2_5_vl" else None)
    assert torch.equal(ours, expected[:, 0])
    assert delta == int(expected_delta)


def test_mismatched_placeholder_is_refused():
    _, items = _layout([("text", 2), (IMAGE, (1, 4, 4), 0.0)])
    bad = MultiModalItem(IMAGE, "x", PlaceholderRange(2, 3), b"", (0, 0, 0, 0), (1, 4, 4))
    with pytest.raises(ValueError, match="does not match"):
        mrope_positions(8, [bad], 2, None)
