"""The HF oracle: greedy generations, top-k logprobs and prompt logprobs from transformers itself.

Caller: parity tests (tests/parity/, model and runner tests) that compare our engine with HF in float32 on
CPU. Each request runs alone (batch 1, no padding), so nothing but the model itself shapes the numbers.

A request is one of:
  list[int]                       prompt token ids (text only)
  str                             prompt text, tokenised as is (no chat template)
  list[dict]                      chat messages; content parts {"type": "text", "text"},
                                  {"type": "image", "image": PIL.Image}, {"type": "video", "video": RefVideo}
  RefRequest                      any of the above plus images/videos for a pre-rendered prompt, tools,
                                  processor kwargs
Videos are given as already-sampled frames: HF samples nothing more (do_sample_frames=False) and the
given fps becomes the sampled fps, so second_per_grid_ts = temporal_patch_size / fps.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class RefVideo:
    frames: np.ndarray  # [num_frames, height, width, 3] uint8, already sampled
    # rate of the sampled frames (with frames_indices: of the source video); None: a bare array, no
    # metadata (transformers assumes 24)
    fps: float | None
    frames_indices: tuple[int, ...] | None = None  # source frame numbers (Qwen3-VL timestamps); None: 0..T-1


@dataclass(frozen=True)
class RefRequest:
    prompt: str | list[int] | None = None     # pre-rendered text (placeholders included) or token ids
    messages: list[dict] | None = None        # or chat messages, rendered with the checkpoint's template
    images: tuple = ()                        # PIL images for a pre-rendered prompt, in prompt order
    videos: tuple[RefVideo, ...] = ()         # videos for a pre-rendered prompt, in prompt order
    tools: list[dict] | None = None
    mm_processor_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RefOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]                      # generated, EOS included when it ended the run
    top_logprobs: list[dict[int, float]]      # per generated step: top_k ids -> log_softmax(raw logits)
    text: str                                 # token_ids decoded, special tokens skipped
    finish_reason: str                        # "stop" (EOS) or "length"


@dataclass(frozen=True)
class _Loaded:
    model: torch.nn.Module
    processor: object          # AutoProcessor for VL checkpoints, AutoTokenizer otherwise
    tokenizer: object
    is_multimodal: bool
    eos_token_ids: tuple[int, ...]


@functools.lru_cache(maxsize=8)
def load(model_dir: str) -> _Loaded:
    """Load (once per process) the float32 eager-attention HF model and its processor/tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    is_multimodal = hasattr(config, "vision_config")
    model_class = AutoModelForImageTextToText if is_multimodal else AutoModelForCausalLM
    model = model_class.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir) if is_multimodal else tokenizer
    generation = json.loads((Path(model_dir) / "generation_config.json").read_text())
    eos = generation.get("eos_token_id", config.get_text_config().eos_token_id)
    eos_token_ids = tuple(eos) if isinstance(eos, list) else (eos,)
    return _Loaded(model, processor, tokenizer, is_multimodal, eos_token_ids)


def _as_request(request) -> RefRequest:
    if isinstance(request, RefRequest):
        return request
    if isinstance(request, str) or (isinstance(request, list) and all(isinstance(t, int) for t in request)):
        return RefRequest(prompt=request)
    if isinstance(request, list):
        return RefRequest(messages=request)
    raise TypeError(f"request: unsupported type {type(request).__name__}")


def _split_messages(messages: list[dict]) -> tuple[list[dict], list, list[RefVideo]]:
    """Template-ready messages (media parts reduced to their type) and the media in prompt order."""
    images, videos, rendered = [], [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    images.append(part["image"])
                    parts.append({"type": "image"})
                elif part.get("type") == "video":
                    videos.append(part["video"])
                    parts.append({"type": "video"})
                else:
                    parts.append(part)
            message = {**message, "content": parts}
        rendered.append(message)
    return rendered, images, videos


def _render(loaded: _Loaded, request: RefRequest) -> tuple[str | list[int], list, list[RefVideo]]:
    if request.messages is None:
        return request.prompt, list(request.images), list(request.videos)
    messages, images, videos = _split_messages(request.messages)
    prompt = loaded.processor.apply_chat_template(
        messages, tools=request.tools, add_generation_prompt=True, tokenize=False)
    return prompt, images, videos


def prepare_inputs(model_dir: str | Path, request) -> dict[str, torch.Tensor]:
    """Model inputs (input_ids [1, L], pixel_values, grid_thw, second_per_grid_ts, ...) for one request."""
    loaded = load(str(model_dir))
    request = _as_request(request)
    prompt, images, videos = _render(loaded, request)
    if isinstance(prompt, list):
        if images or videos:
            raise ValueError("prompt: token-id prompts cannot carry images/videos; give the prompt as text")
        return {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt), dtype=torch.long)}
    if not loaded.is_multimodal:
        return dict(loaded.tokenizer(prompt, return_tensors="pt"))
    media_kwargs = dict(request.mm_processor_kwargs)
    if videos:
        media_kwargs.update(videos=[video.frames for video in videos], do_sample_frames=False)
        bare = [video.fps is None for video in videos]
        if any(bare) and not all(bare):
            raise ValueError("videos: either all bare arrays (fps None) or all with an fps")
        if not all(bare):
            media_kwargs["video_metadata"] = [_video_metadata(video) for video in videos]
    return dict(loaded.processor(text=[prompt], images=images or None, return_tensors="pt", **media_kwargs))


def _video_metadata(video: RefVideo) -> dict:
    num_frames, height, width = video.frames.shape[:3]
    indices = list(video.frames_indices) if video.frames_indices is not None else list(range(num_frames))
    return {"total_num_frames": max(indices) + 1, "fps": float(video.fps), "frames_indices": indices,
            "height": height, "width": width, "duration": (max(indices) + 1) / float(video.fps)}


def _top_k(logits: torch.Tensor, top_k: int) -> dict[int, float]:
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [vocab]
    values, ids = torch.topk(logprobs, top_k)
    return {int(i): float(v) for i, v in zip(ids, values)}


@torch.inference_mode()
def _generate_one(model_dir: str, request, max_new_tokens: int, top_k: int, ignore_eos: bool,
                  stop_token_ids: tuple[int, ...]) -> RefOutput:
    loaded = load(model_dir)
    inputs = prepare_inputs(model_dir, request)
    eos_token_ids = ([] if ignore_eos else list(loaded.eos_token_ids)) + list(stop_token_ids)
    loaded.model.generation_config.eos_token_id = eos_token_ids or None
    output = loaded.model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, output_logits=True,
        return_dict_in_generate=True, pad_token_id=loaded.tokenizer.pad_token_id,
        eos_token_id=eos_token_ids or None, repetition_penalty=None, temperature=None, top_k=None, top_p=None)
    prompt_ids = inputs["input_ids"][0].tolist()
    token_ids = output.sequences[0, len(prompt_ids):].tolist()
    top_logprobs = [_top_k(step_logits[0], top_k) for step_logits in output.logits]  # [1, vocab] each
    is_stop = bool(token_ids) and token_ids[-1] in eos_token_ids
    return RefOutput(
        prompt_token_ids=prompt_ids, token_ids=token_ids, top_logprobs=top_logprobs[: len(token_ids)],
        text=loaded.tokenizer.decode(token_ids, skip_special_tokens=True),
        finish_reason="stop" if is_stop else "length")


def hf_generate(model_dir: str | Path, requests: list, max_new_tokens: int, top_k: int = 5,
                ignore_eos: bool = False, stop_token_ids: tuple[int, ...] = ()) -> list[RefOutput]:
    """Greedy HF generation, one request at a time, with top_k logprobs of every generated step.

    Stops on the checkpoint's EOS ids (generation_config.json) unless ignore_eos, and on stop_token_ids
    always (vLLM's semantics); the stopping token is included in token_ids.
    """
    stop_token_ids = tuple(stop_token_ids)
    return [_generate_one(str(model_dir), request, max_new_tokens, top_k, ignore_eos, stop_token_ids)
            for request in requests]


@torch.inference_mode()
def hf_prompt_logprobs(model_dir: str | Path, requests: list, top_k: int = 5) -> list[list[dict[int, float] | None]]:
    """Per prompt position: None for the first token, then {top_k ids and the actual token: logprob}."""
    results = []
    for request in requests:
        loaded = load(str(model_dir))
        inputs = prepare_inputs(model_dir, request)
        logits = loaded.model(**inputs).logits[0]  # [prompt_len, vocab]
        prompt_ids = inputs["input_ids"][0].tolist()
        per_position: list[dict[int, float] | None] = [None]
        for position, token_id in enumerate(prompt_ids[1:]):
            entry = _top_k(logits[position], top_k)
            entry[token_id] = float(torch.log_softmax(logits[position].float(), dim=-1)[token_id])
            per_position.append(entry)
        results.append(per_position)
    return results
