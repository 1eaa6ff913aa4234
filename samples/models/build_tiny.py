"""Build tiny random-weight checkpoints in exact Hugging Face layout (Qwen2, Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Caller: tests/conftest.py (`tiny_model_dir` fixture) and humans:
    python samples/models/build_tiny.py --out samples/models/out [qwen2 qwen2_vl qwen2_5_vl qwen3_vl]
Each directory holds config.json, float32 safetensors (qwen2: two shards + index), tokenizer.json,
tokenizer_config.json, chat_template.jinja, generation_config.json and, for the VL models,
preprocessor_config.json and video_preprocessor_config.json. Shapes are tiny but structurally real:
GQA, M-RoPE, window attention with full-attention blocks, tied and untied heads, a vocab that is not a
multiple of 64. Weights are seeded per parameter name, so the bytes are identical on every build.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_tokenizer import (  # noqa: E402
    NON_SPECIAL_ADDED_TOKENS, QWEN2_5_CHAT_TEMPLATE, QWEN2_VL_CHAT_TEMPLATE, SPECIAL_TOKENS,
    special_token_ids, train_tokenizer,
)

MODEL_NAMES = ("qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Tokenizer has 1046 tokens; qwen2_vl's vocab is deliberately not a multiple of 64.
VOCAB_SIZES = {"qwen2": 1088, "qwen2_vl": 1063, "qwen2_5_vl": 1088, "qwen3_vl": 1075}
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
MIN_PIXELS, MAX_PIXELS = 3136, 12845056
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28
# Qwen3-VL (patch 16, mean/std 0.5 as on the hub); the image floor is lowered from the hub's 65536 so
# tiny test images stay a few tokens; the video sizes are the hub's.
QWEN3_IMAGE_SIZE = {"shortest_edge": 64 * 64, "longest_edge": 16777216}
QWEN3_VIDEO_SIZE = {"shortest_edge": 4096, "longest_edge": 25165824}
QWEN3_MEAN_STD = [0.5, 0.5, 0.5]
CHAT_TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "chat_templates"


def text_kwargs(name: str, ids: dict[str, int], shape: str = "default") -> dict:
    """LM shape. default: hidden 64, 3 layers, 4 query / 2 KV heads of 16, M-RoPE sections [2, 3, 3].
    alt: hidden 96, 2 layers, 6 query heads sharing 1 KV head (GQA 6:1), sections [2, 2, 4], another
    rope theta and a vocab 13 rows larger - so nothing may depend on the default's numbers."""
    alt = shape == "alt"
    rope = {"rope_type": "default", "rope_theta": 10000.0 if alt else 1000000.0}
    if name != "qwen2":
        rope["mrope_section"] = [2, 2, 4] if alt else [2, 3, 3]
    layers = 2 if alt else 3
    return dict(
        vocab_size=VOCAB_SIZES[name] + (13 if alt else 0), hidden_size=96 if alt else 64,
        intermediate_size=160 if alt else 128, num_hidden_layers=layers, num_attention_heads=6 if alt else 4,
        num_key_value_heads=1 if alt else 2, hidden_act="silu", max_position_embeddings=8192,
        rms_norm_eps=1e-6, rope_parameters=rope, use_sliding_window=False, max_window_layers=layers,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
    )


def make_config(name: str, ids: dict[str, int], shape: str = "default"):
    """shape: default, or alt (other head counts, GQA ratio, depths, window blocks, tying; see
    text_kwargs) for the parity tests that guard against depending on the default's shapes."""
    from transformers import Qwen2_5_VLConfig, Qwen2Config, Qwen2VLConfig

    alt = shape == "alt"
    text = text_kwargs(name, ids, shape)
    media_ids = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    if name == "qwen2":
        return Qwen2Config(**text, tie_word_embeddings=not alt, dtype="float32")
    if name == "qwen2_vl":
        vision = dict(depth=3 if alt else 2, embed_dim=48 if alt else 32, hidden_size=text["hidden_size"],
                      hidden_act="quick_gelu", mlp_ratio=2 if alt else 4, num_heads=3 if alt else 2, in_channels=3,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=alt, dtype="float32",
                             **media_ids)
    if name == "qwen2_5_vl":
        vision = dict(depth=4 if alt else 3, hidden_size=48 if alt else 32, intermediate_size=72 if alt else 48,
                      hidden_act="silu", num_heads=3 if alt else 2, in_channels=3, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=4 if alt else 2,
                      window_size=112, out_hidden_size=text["hidden_size"],
                      fullatt_block_indexes=[0, 3] if alt else [1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=not alt,
                                dtype="float32", **media_ids)
    if name == "qwen3_vl":
        return qwen3_vl_config(text, media_ids, alt)
    raise ValueError(f"name: unknown tiny model {name!r}; expected one of {MODEL_NAMES}")


def qwen3_vl_config(text: dict, media_ids: dict, alt: bool):
    """Qwen3-VL: the LM gets QK-norm and head_dim 16 (explicit, as Qwen3 configs carry it); the tower
    patch 16, learned position embeddings (a 6x6 / 5x5 table, interpolated), DeepStack taps at tower
    blocks [0, 1] (alt: [1, 3]) feeding the first two decoder layers, GELU-tanh MLP."""
    from transformers import Qwen3VLConfig

    text = {k: v for k, v in text.items() if k not in ("use_sliding_window", "max_window_layers")}
    text.update(head_dim=16, attention_bias=False, tie_word_embeddings=not alt)
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True,
                                   rope_theta=5000000.0 if not alt else 10000.0)
    vision = dict(depth=4 if alt else 3, hidden_size=48 if alt else 32, intermediate_size=72 if alt else 64,
                  hidden_act="gelu_pytorch_tanh", num_heads=3 if alt else 2, in_channels=3, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text["hidden_size"],
                  num_position_embeddings=25 if alt else 36, deepstack_visual_indexes=[1, 3] if alt else [0, 1])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=not alt, dtype="float32",
                         **media_ids)


SHAPES = ("default", "alt")


class InitScale(NamedTuple):
    """Weight scales of a tiny checkpoint. `default`: gain 1.5 on matrices, embeddings std 0.25 - greedy
    margins are wide in float32 but the network is chaotic, so bfloat16 moves transformers' own top-5
    logprobs by 0.1-0.2. `bf16`: gain 0.7, embeddings std 0.1 - transformers in bf16 stays within ~0.03
    of its float32 logprobs, the scale on which the issue-7 check (GPU bf16 vs CPU float32) is meaningful.
    """
    matrix_gain: float = 1.5
    embedding_std: float = 0.25


INIT_SCALES = {"default": InitScale(), "bf16": InitScale(matrix_gain=0.7, embedding_std=0.1)}


def init_weights(model: torch.nn.Module, scale: InitScale = InitScale()) -> None:
    """Seed every parameter from its own name, with scales that keep greedy decoding non-degenerate.

    HF's std 0.02 makes tiny-model logits near uniform; here matrices get gain/sqrt(fan_in), embeddings
    `embedding_std` (larger ones make tied models copy their input token), norms 1 + noise and biases
    small noise, so a missed or transposed load shows. Tuned so greedy runs neither loop nor ignore images.
    """
    for param_name, param in model.named_parameters():
        generator = torch.Generator().manual_seed(zlib.crc32(param_name.encode()))
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        is_norm = any(key in param_name for key in ("norm", "ln_q"))
        if is_norm and param_name.endswith("weight"):
            value = 1.0 + 0.1 * noise
        elif param_name.endswith("bias"):
            value = 0.1 * noise
        elif "embed_tokens" in param_name or "lm_head" in param_name:
            value = scale.embedding_std * noise
        else:
            fan_in = param[0].numel()
            value = noise * (scale.matrix_gain / fan_in**0.5)
        with torch.no_grad():
            param.copy_(value)


def suppress_unemittable_rows(model: torch.nn.Module, ids: dict[str, int], tokenizer_len: int) -> None:
    """Shrink the output rows of media/structural specials and of vocab padding (ids >= tokenizer_len).

    Trained Qwen models never emit these; with random weights they would, and a generated <|image_pad|>
    or an id without a token would make greedy parity runs about an accident. EOS ids stay emittable.
    """
    emittable = {"<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>"}
    rows = [token_id for token, token_id in ids.items() if token not in emittable]
    output_weight = model.get_output_embeddings().weight  # [vocab, hidden]; the embedding when tied
    rows += list(range(tokenizer_len, output_weight.shape[0]))
    with torch.no_grad():
        output_weight[rows] *= 0.05


def make_model(name: str, config, scale: InitScale = InitScale()) -> torch.nn.Module:
    from transformers import (Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM, Qwen2VLForConditionalGeneration,
                              Qwen3VLForConditionalGeneration)

    model_class = {
        "qwen2": Qwen2ForCausalLM, "qwen2_vl": Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration,
    }[name]
    torch.manual_seed(0)
    model = model_class(config).to(torch.float32).eval()
    init_weights(model, scale)
    return model


def make_hf_tokenizer(chat_template: str):
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(
        tokenizer_object=train_tokenizer(), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, errors="replace", model_max_length=32768,
        split_special_tokens=False, clean_up_tokenization_spaces=False,
        additional_special_tokens=list(SPECIAL_TOKENS), add_prefix_space=False,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def write_tokenizer_files(name: str, out_dir: Path) -> dict[str, int]:
    """Tokenizer (+ processor configs for VL) in the layout transformers 5 saves; returns special ids.

    The VL processor files are written as JSON rather than through the processors' save_pretrained:
    instantiating transformers' video processors demands torchvision, which serving does not need."""
    template = {"qwen2": QWEN2_5_CHAT_TEMPLATE, "qwen3_vl": (CHAT_TEMPLATES_DIR / "qwen3_vl.jinja").read_text()
                }.get(name, QWEN2_VL_CHAT_TEMPLATE)
    tokenizer = make_hf_tokenizer(template)
    tokenizer.save_pretrained(out_dir)
    if name != "qwen2":
        processor_class = PROCESSOR_CLASSES[name]
        tokenizer_config_path = out_dir / "tokenizer_config.json"
        tokenizer_config = json.loads(tokenizer_config_path.read_text())
        tokenizer_config["processor_class"] = processor_class  # what the processor's save adds
        tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
        write_preprocessor_configs(name, out_dir)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + NON_SPECIAL_ADDED_TOKENS}
    if ids != special_token_ids(train_tokenizer()):
        raise RuntimeError("saved tokenizer ids differ from the trained tokenizer's")
    return ids


PROCESSOR_CLASSES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


def write_qwen3_vl_preprocessor_configs(out_dir: Path) -> None:
    """The two files Qwen/Qwen3-VL-*-Instruct ship (sizes above; cap_pixels_per_frame explicit)."""
    common = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": QWEN3_MEAN_STD,
              "image_std": QWEN3_MEAN_STD, "processor_class": "Qwen3VLProcessor"}
    image = {**common, "size": QWEN3_IMAGE_SIZE, "image_processor_type": "Qwen2VLImageProcessorFast"}
    video = {**common, "size": QWEN3_VIDEO_SIZE, "video_processor_type": "Qwen3VLVideoProcessor",
             "fps": 2, "min_frames": 4, "max_frames": 768, "do_sample_frames": True, "cap_pixels_per_frame": True}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n")
    (out_dir / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")


def write_preprocessor_configs(name: str, out_dir: Path) -> None:
    """preprocessor_config.json and video_preprocessor_config.json in the shape the Qwen hub checkpoints ship."""
    if name == "qwen3_vl":
        return write_qwen3_vl_preprocessor_configs(out_dir)
    processor_class = PROCESSOR_CLASSES[name]
    geometry = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    normalisation = {"image_mean": IMAGE_MEAN, "image_std": IMAGE_STD}
    image = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, **geometry, **normalisation,
             "image_processor_type": "Qwen2VLImageProcessor", "processor_class": processor_class}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n")
    video = {
        "min_pixels": VIDEO_MIN_PIXELS, "max_pixels": VIDEO_MAX_PIXELS, **geometry, **normalisation,
        "processor_class": processor_class, "video_processor_type": "Qwen2VLVideoProcessor",
        "size": {"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS},
        # qwen-vl-utils' total-pixel budget per video; transformers' default from v5.22 on, explicit here.
        "cap_pixels_per_frame": True,
    }
    (out_dir / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")


def shard_in_two(out_dir: Path) -> None:
    """Replace model.safetensors by two shards + model.safetensors.index.json (HF sharded layout)."""
    single = out_dir / "model.safetensors"
    tensors = load_file(single)
    names = sorted(tensors)
    halves = (names[: len(names) // 2], names[len(names) // 2:])
    weight_map, total_size = {}, 0
    for index, shard_names in enumerate(halves, start=1):
        shard_file = f"model-{index:05d}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in shard_names}, out_dir / shard_file, metadata={"format": "pt"})
        for n in shard_names:
            weight_map[n] = shard_file
            total_size += tensors[n].numel() * tensors[n].element_size()
    index_json = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    single.unlink()


def write_generation_config(out_dir: Path, ids: dict[str, int]) -> None:
    generation = {
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "do_sample": False,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def build(name: str, out_dir: Path, scale: str = "default", shape: str = "default") -> Path:
    """Write the tiny checkpoint `name` into out_dir (created; existing files overwritten); return out_dir.
    `scale`: a key of INIT_SCALES; `shape`: one of SHAPES."""
    if name not in MODEL_NAMES:
        raise ValueError(f"name: unknown tiny model {name!r}; expected one of {MODEL_NAMES}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer_files(name, out_dir)
    if scale not in INIT_SCALES:
        raise ValueError(f"scale: unknown init scale {scale!r}; expected one of {tuple(INIT_SCALES)}")
    if shape not in SHAPES:
        raise ValueError(f"shape: unknown shape {shape!r}; expected one of {SHAPES}")
    model = make_model(name, make_config(name, ids, shape), INIT_SCALES[scale])
    suppress_unemittable_rows(model, ids, tokenizer_len=max(ids.values()) + 1)
    model.save_pretrained(out_dir, safe_serialization=True)
    write_generation_config(out_dir, ids)
    if name == "qwen2":
        shard_in_two(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("names", nargs="*", default=list(MODEL_NAMES),
                        help=f"any of {', '.join(MODEL_NAMES)} (default: all)")
    parser.add_argument("--scale", choices=tuple(INIT_SCALES), default="default",
                        help="weight scale: bf16 builds checkpoints on which bfloat16 stays close to float32")
    parser.add_argument("--shape", choices=SHAPES, default="default",
                        help="alt: other head counts, GQA ratio, depths, window blocks and tying")
    args = parser.parse_args(argv)
    for name in args.names:
        print(build(name, args.out / name, args.scale, args.shape))


if __name__ == "__main__":
    main()
