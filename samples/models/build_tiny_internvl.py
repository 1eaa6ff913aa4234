"""Build a tiny random-weight InternVL2.5-style checkpoint in two layouts.

Caller: tests/conftest.py (`tiny_model_dir("internvl")` / `tiny_model_dir("internvl_chat")`) and humans:
    python samples/models/build_tiny_internvl.py --out samples/models/out [internvl internvl_chat]

  internvl       transformers' native layout, written by transformers itself: InternVLConfig +
                 InternVLForConditionalGeneration (InternViT + pixel shuffle + mlp projector + Qwen2),
                 InternVLProcessor (GotOcr2ImageProcessor, InternVLVideoProcessor), tokenizer with
                 <img>, </img>, <IMG_CONTEXT>, <video> and an InternVL2.5 chat template.
  internvl_chat  the same weights in OpenGVLab's original layout: `vision_model.*` (fused attn.qkv),
                 `mlp1.{0,1,3}.*`, `language_model.model.*` / `language_model.lm_head.*`, and a config
                 with architectures ["InternVLChatModel"], `llm_config`, `vision_config`.
Tiles are 56x56 (4x4 patches of 14 -> 4 tokens per tile after the 0.5 pixel shuffle) so tests stay fast;
up to 6 tiles per image. Weights are seeded per parameter name (bytes identical on every build).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_tiny import init_weights, suppress_unemittable_rows, text_kwargs, write_generation_config  # noqa: E402
from tiny_tokenizer import NON_SPECIAL_ADDED_TOKENS, SPECIAL_TOKENS, train_tokenizer  # noqa: E402

MODEL_NAMES = ("internvl", "internvl_chat")
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
VOCAB_SIZE = 1093  # tokenizer has 1050 tokens; deliberately not a multiple of 64
IMAGE_SIZE, PATCH_SIZE, MAX_PATCHES = 56, 14, 6
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SYSTEM_PROMPT = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                 "多模态大语言模型。")


def chat_template(image_placeholder: str) -> str:
    """InternVL2.5's conversation format (its system prompt, <|im_start|> turns); one placeholder line
    per image (`<IMG_CONTEXT>` for transformers' processor, `<image>` for the original layout)."""
    return (
        "{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}"
        "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}{%- endif -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for content in message['content'] -%}"
        "{%- if content['type'] == 'image' -%}{{ '" + image_placeholder + "\\n' }}"
        "{%- elif content['type'] == 'video' -%}{{ '<video>\\n' }}"
        "{%- elif content['type'] == 'text' -%}{{ content['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}{{ '<|im_end|>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


def make_tokenizer(template: str):
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    backend = train_tokenizer()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in INTERNVL_TOKENS.values()])
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        bos_token=None, errors="replace", model_max_length=32768, split_special_tokens=False,
        clean_up_tokenization_spaces=False, additional_special_tokens=list(SPECIAL_TOKENS),
        extra_special_tokens=dict(INTERNVL_TOKENS), add_prefix_space=False)
    tokenizer.chat_template = template
    return tokenizer


def token_ids(tokenizer) -> dict[str, int]:
    names = SPECIAL_TOKENS + NON_SPECIAL_ADDED_TOKENS + tuple(INTERNVL_TOKENS.values())
    return {t: tokenizer.convert_tokens_to_ids(t) for t in names}


def make_config(ids: dict[str, int]):
    from transformers import InternVLConfig

    text = text_kwargs("qwen2", ids)
    text.update(vocab_size=VOCAB_SIZE, tie_word_embeddings=False)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, norm_type="layer_norm", use_qk_norm=False,
                  attention_bias=True, hidden_act="gelu", layer_norm_eps=1e-6, use_mean_pooling=True)
    tokens_per_tile = ((IMAGE_SIZE // PATCH_SIZE) // 2) ** 2
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=ids["<IMG_CONTEXT>"],
                          image_seq_length=tokens_per_tile, downsample_ratio=0.5, projector_hidden_act="gelu",
                          tie_word_embeddings=False, dtype="float32")


def make_processor(tokenizer, image_seq_length: int):
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = GotOcr2ImageProcessor(size=size, crop_to_patches=False, min_patches=1, max_patches=MAX_PATCHES,
                                            image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    video_processor = InternVLVideoProcessor(size=size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                             image_seq_length=image_seq_length, chat_template=tokenizer.chat_template)


def build_hf_native(out_dir: Path) -> Path:
    from transformers import InternVLForConditionalGeneration

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(chat_template("<IMG_CONTEXT>"))
    ids = token_ids(tokenizer)
    config = make_config(ids)
    make_processor(tokenizer, config.image_seq_length).save_pretrained(out_dir)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).to(torch.float32).eval()
    init_weights(model)
    with torch.no_grad():  # layer scales near InternViT's trained magnitude, not 1.5/sqrt(1)
        for name, param in model.named_parameters():
            if ".lambda_" in name:
                param.mul_(0.1)
    suppress_unemittable_rows(model, ids, tokenizer_len=len(tokenizer))
    model.save_pretrained(out_dir, safe_serialization=True)
    write_generation_config(out_dir, ids)
    return out_dir


# ---- original (OpenGVLab) layout --------------------------------------------------------------

_RENAMES = (  # transformers' on-disk name piece -> original name piece, applied in order
    ("vision_tower.", "vision_model."), (".cls_token", ".class_embedding"),
    (".position_embeddings", ".position_embedding"), (".patch_embeddings.projection.", ".patch_embedding."),
    ("encoder.layer.", "encoder.layers."), (".attention.projection_layer.", ".attn.proj."),
    (".attention.q_norm.", ".attn.q_norm."), (".attention.k_norm.", ".attn.k_norm."),
    (".layernorm_before.", ".norm1."), (".layernorm_after.", ".norm2."), (".lambda_1", ".ls1"),
    (".lambda_2", ".ls2"), ("multi_modal_projector.layer_norm.", "mlp1.0."),
    ("multi_modal_projector.linear_1.", "mlp1.1."), ("multi_modal_projector.linear_2.", "mlp1.3."),
)  # language_model.model.* and language_model.lm_head.* are already the original names


def original_weights(hf_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in hf_weights.items():
        if ".attention.k_proj." in name or ".attention.v_proj." in name:
            continue  # fused into attn.qkv below
        new = name
        if not name.startswith("language_model."):
            for old, repl in _RENAMES:
                new = new.replace(old, repl)
        if ".attention.q_proj." in name:
            tensor = torch.cat([hf_weights[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
            new = new.replace(".attention.q_proj.", ".attn.qkv.")
        out[new] = tensor.contiguous()
    return out


def original_config(hf_config: dict) -> dict:
    vision, text = hf_config["vision_config"], hf_config["text_config"]
    llm_config = {k: v for k, v in text.items() if k not in ("transformers_version",)}
    llm_config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    vision_config = {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": vision["hidden_size"],
        "num_hidden_layers": vision["num_hidden_layers"], "num_attention_heads": vision["num_attention_heads"],
        "intermediate_size": vision["intermediate_size"], "image_size": vision["image_size"][0],
        "patch_size": vision["patch_size"][0], "num_channels": 3, "qkv_bias": vision["attention_bias"],
        "qk_normalization": vision["use_qk_norm"], "norm_type": vision["norm_type"],
        "layer_norm_eps": vision["layer_norm_eps"], "hidden_act": vision["hidden_act"], "use_flash_attn": False,
        "drop_path_rate": 0.0, "dropout": 0.0, "attention_dropout": 0.0, "initializer_factor": 1.0,
    }
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "llm_config": llm_config, "vision_config": vision_config, "downsample_ratio": hf_config["downsample_ratio"],
        "force_image_size": vision["image_size"][0], "select_layer": hf_config["vision_feature_layer"],
        "ps_version": "v2", "template": "internvl2_5", "dynamic_image_size": True, "use_thumbnail": True,
        "min_dynamic_patch": 1, "max_dynamic_patch": MAX_PATCHES, "use_backbone_lora": 0, "use_llm_lora": 0,
        "tie_word_embeddings": False, "torch_dtype": "float32",
    }


def build_original(out_dir: Path, hf_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = original_weights(load_file(hf_dir / "model.safetensors"))
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = original_config(json.loads((hf_dir / "config.json").read_text()))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = make_tokenizer(chat_template("<image>"))
    tokenizer.save_pretrained(out_dir)
    shutil.copy(hf_dir / "generation_config.json", out_dir / "generation_config.json")
    return out_dir


def build(name: str, out_dir: Path) -> Path:
    """Write the tiny checkpoint `name` into out_dir; return out_dir."""
    if name not in MODEL_NAMES:
        raise ValueError(f"name: unknown tiny InternVL model {name!r}; expected one of {MODEL_NAMES}")
    out_dir = Path(out_dir)
    if name == "internvl":
        return build_hf_native(out_dir)
    hf_dir = out_dir.parent / f".{out_dir.name}.hf"
    try:
        build_hf_native(hf_dir)
        return build_original(out_dir, hf_dir)
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("names", nargs="*", default=list(MODEL_NAMES))
    args = parser.parse_args(argv)
    for name in args.names:
        print(build(name, args.out / name))


if __name__ == "__main__":
    main()
