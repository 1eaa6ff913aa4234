"""Real-shape checkpoint directories without weights, for GPU benchmarks that initialise random weights.

Caller: bench/ (and tests/samples). `real_shape_config(name)` returns a transformers config with the shapes
of /work/shared/REFERENCE.md; `write_real_shape_dir(name, out_dir)` writes config.json, the tiny tokenizer
and the processor configs, but no safetensors. The tokenizer is the tiny one, so its special-token ids
(not Qwen's 151643...) are written into the config; vocab_size keeps the real (padded) value.
    python samples/models/real_shape.py --out samples/models/out [qwen2_5_vl_3b ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_tiny import write_generation_config, write_tokenizer_files  # noqa: E402

REAL_SHAPE_NAMES = ("qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_vl_7b", "qwen2_5_14b", "qwen3_vl_2b", "qwen3_vl_4b",
                    "qwen3_vl_8b")
# name -> (tiny builder name for tokenizer/processor files, LM shape, tied)
_LM_SHAPES = {
    "qwen2_5_vl_3b": ("qwen2_5_vl", dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                                         num_key_value_heads=2, intermediate_size=11008, vocab_size=151936), True),
    "qwen2_5_vl_7b": ("qwen2_5_vl", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                         num_key_value_heads=4, intermediate_size=18944, vocab_size=152064), False),
    "qwen2_vl_7b": ("qwen2_vl", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                     num_key_value_heads=4, intermediate_size=18944, vocab_size=152064), False),
    "qwen2_5_14b": ("qwen2", dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
                                  num_key_value_heads=8, intermediate_size=13824, vocab_size=152064), False),
}
# Qwen/Qwen3-VL-{2B,4B,8B}-Instruct: LM (head_dim 128, 8 KV heads) and tower (patch 16, 48x48 learned
# position table, GELU-tanh MLP, DeepStack taps) as in their config.json.
_QWEN3_VL_SHAPES = {
    "qwen3_vl_2b": (dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, intermediate_size=6144),
                    dict(depth=24, hidden_size=1024, intermediate_size=4096, deepstack_visual_indexes=[5, 11, 17]),
                    True),
    "qwen3_vl_4b": (dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, intermediate_size=9728),
                    dict(depth=24, hidden_size=1024, intermediate_size=4096, deepstack_visual_indexes=[5, 11, 17]),
                    True),
    "qwen3_vl_8b": (dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, intermediate_size=12288),
                    dict(depth=27, hidden_size=1152, intermediate_size=4304, deepstack_visual_indexes=[8, 16, 24]),
                    False),
}


def qwen3_vl_config(name: str, ids: dict[str, int]):
    from transformers import Qwen3VLConfig

    text_shape, vision_shape, is_tied = _QWEN3_VL_SHAPES[name]
    text = dict(text_shape, num_key_value_heads=8, head_dim=128, vocab_size=151936, hidden_act="silu",
                max_position_embeddings=262144, rms_norm_eps=1e-6, attention_bias=False, tie_word_embeddings=is_tied,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    vision = dict(vision_shape, num_heads=16, hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                  out_hidden_size=text_shape["hidden_size"])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=is_tied, dtype="bfloat16",
                         image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                         vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _text_kwargs(name: str, ids: dict[str, int]) -> dict:
    tiny_name, shape, _ = _LM_SHAPES[name]
    rope = {"rope_type": "default", "rope_theta": 1000000.0}
    if tiny_name != "qwen2":
        rope["mrope_section"] = [16, 24, 24]
    return dict(
        shape, hidden_act="silu", max_position_embeddings=128000 if tiny_name == "qwen2_5_vl" else 32768,
        rms_norm_eps=1e-6, rope_parameters=rope, use_sliding_window=False,
        max_window_layers=shape["num_hidden_layers"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
    )


def _vision_kwargs(name: str) -> dict:
    out_hidden = _LM_SHAPES[name][1]["hidden_size"]
    common = dict(in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if name == "qwen2_vl_7b":
        return dict(common, depth=32, embed_dim=1280, hidden_size=out_hidden, hidden_act="quick_gelu",
                    mlp_ratio=4, num_heads=16)
    return dict(common, depth=32, hidden_size=1280, intermediate_size=3420, hidden_act="silu", num_heads=16,
                tokens_per_second=2, window_size=112, out_hidden_size=out_hidden,
                fullatt_block_indexes=[7, 15, 23, 31])


def real_shape_config(name: str, ids: dict[str, int] | None = None):
    """transformers config of model `name` (one of REAL_SHAPE_NAMES), float32 dtype left to the caller."""
    from transformers import Qwen2_5_VLConfig, Qwen2Config, Qwen2VLConfig

    if name not in REAL_SHAPE_NAMES:
        raise ValueError(f"name: unknown real-shape model {name!r}; expected one of {REAL_SHAPE_NAMES}")
    if ids is None:
        from tiny_tokenizer import special_token_ids, train_tokenizer

        ids = special_token_ids(train_tokenizer())
    if name in _QWEN3_VL_SHAPES:
        return qwen3_vl_config(name, ids)
    tiny_name, _, is_tied = _LM_SHAPES[name]
    if tiny_name == "qwen2":
        return Qwen2Config(**_text_kwargs(name, ids), tie_word_embeddings=is_tied, dtype="bfloat16")
    config_class = Qwen2VLConfig if tiny_name == "qwen2_vl" else Qwen2_5_VLConfig
    return config_class(
        text_config=_text_kwargs(name, ids), vision_config=_vision_kwargs(name), tie_word_embeddings=is_tied,
        dtype="bfloat16", image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def write_real_shape_dir(name: str, out_dir: Path) -> Path:
    """Write config.json + tokenizer + processor/generation configs (no weights) into out_dir."""
    if name not in REAL_SHAPE_NAMES:
        raise ValueError(f"name: unknown real-shape model {name!r}; expected one of {REAL_SHAPE_NAMES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny_name = "qwen3_vl" if name in _QWEN3_VL_SHAPES else _LM_SHAPES[name][0]
    ids = write_tokenizer_files(tiny_name, out_dir)
    config = real_shape_config(name, ids)
    config.architectures = [{"qwen2": "Qwen2ForCausalLM", "qwen2_vl": "Qwen2VLForConditionalGeneration",
                             "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                             "qwen3_vl": "Qwen3VLForConditionalGeneration"}[tiny_name]]
    config.save_pretrained(out_dir)
    write_generation_config(out_dir, ids)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("names", nargs="*", default=list(REAL_SHAPE_NAMES),
                        help=f"any of {', '.join(REAL_SHAPE_NAMES)} (default: all)")
    args = parser.parse_args(argv)
    for name in args.names:
        print(write_real_shape_dir(name, args.out / name))


if __name__ == "__main__":
    main()
