"""EngineConfig from vLLM's LLM(...) / CLI keyword names: resolve the checkpoint, read its HF
config and generation config, check what we support, and fill the frozen config dataclasses.

Callers: LLM(...) (engine.llm) and the server (app.server) through `create_engine_config(**kwargs)`.
All file I/O of configuration is here; engine.config holds only the frozen dataclasses.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import torch

from engine.config import (CacheConfig, DeviceConfig, EngineConfig, ModelConfig, MultiModalConfig,
                           ParallelConfig, SchedulerConfig, resolve_device, resolve_dtype, text_config)
from engine.sampling_params import SamplingParams
from engine.structured_output.config import StructuredOutputsConfig
from engine.weights import resolve_model_path

logger = logging.getLogger("vlserve.config")

# Every keyword we accept, with its default. Anything else is a TypeError naming it.
ENGINE_ARG_DEFAULTS: dict[str, Any] = {
    "model": None, "tokenizer": None, "revision": None, "tokenizer_revision": None,
    "trust_remote_code": False, "dtype": "auto", "device": "auto", "seed": 0,
    "max_model_len": None, "load_format": "auto",
    "block_size": 16, "gpu_memory_utilization": 0.9, "kv_cache_memory_bytes": None,
    "num_gpu_blocks_override": None, "enable_prefix_caching": True, "kv_cache_dtype": "auto",
    "cpu_offload_gb": 0.0, "swap_space": None,
    "max_num_seqs": 256, "max_num_batched_tokens": None, "enable_chunked_prefill": True,
    "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "distributed_executor_backend": None,
    "mm_encoder_tp_mode": "data",
    "enforce_eager": False, "deterministic": True, "async_scheduling": None, "mixed_graph_max_tokens": 1024,
    "limit_mm_per_prompt": None, "mm_processor_kwargs": None, "encoder_cache_size": None,
    "generation_config": "auto", "override_generation_config": None,
    "download_dir": None, "max_logprobs": 20, "hf_overrides": None, "media_io_kwargs": None,
    "mm_processor_cache_gb": 4.0,
    "structured_outputs_config": None,
}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192

# Architectures whose config.json transformers cannot read without remote code (the original
# InternVL layout): architecture -> reader(path, raw config dict) -> config object. Our own code
# reads them, so no checkpoint Python runs and --trust-remote-code is not needed (still accepted).
DICT_CONFIG_READERS: dict[str, Callable[[str, dict], Any]] = {
    "InternVLChatModel": lambda path, raw: _internvl_chat_reader()(path, raw),
}


def _internvl_chat_reader() -> Callable[[str, dict], Any]:
    from engine.models.internvl import read_internvl_chat_config

    return read_internvl_chat_config


def create_engine_config(**kwargs: Any) -> EngineConfig:
    """Build from LLM(...) / CLI keyword arguments (vLLM's names). Reads the HF config."""
    unknown = sorted(set(kwargs) - set(ENGINE_ARG_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
    args = {**ENGINE_ARG_DEFAULTS, **kwargs}
    if not args["model"]:
        raise ValueError("--model: a model name or path is required")
    _check_load_format(args)
    device = resolve_device(args["device"])
    model_config = _model_config(args, device)
    return EngineConfig(
        model_config=model_config,
        cache_config=_cache_config(args),
        scheduler_config=_scheduler_config(args, model_config.max_model_len, device),
        parallel_config=_parallel_config(args, model_config, device),
        device_config=DeviceConfig(device=device, enforce_eager=bool(args["enforce_eager"]),
                                   deterministic=bool(args["deterministic"]),
                                   mixed_graph_max_tokens=int(args["mixed_graph_max_tokens"])),
        multimodal_config=_multimodal_config(args),
        structured_outputs_config=StructuredOutputsConfig.parse(args["structured_outputs_config"]),
    )


def _parallel_config(args: dict, model_config: ModelConfig, device: str) -> ParallelConfig:
    """TP/PP sizes checked against the model's shape; the executor backend resolved: uni for one
    rank, else mp on one host, ray when the world needs more GPUs than this host has."""
    tp, pp = int(args["tensor_parallel_size"]), int(args["pipeline_parallel_size"])
    backend = args["distributed_executor_backend"]
    if backend is None and tp * pp > 1:
        backend = "ray" if device == "cuda" and tp * pp > torch.cuda.device_count() else "mp"
    config = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                            distributed_executor_backend=backend, mm_encoder_tp_mode=args["mm_encoder_tp_mode"])
    if config.world_size > 1:
        _check_model_supports_parallel(model_config.architecture)
        _check_model_splits(config, model_config.hf_config)
    if device == "cuda" and backend == "mp" and config.world_size > torch.cuda.device_count():
        raise ValueError(f"--tensor-parallel-size: tensor x pipeline parallel size {config.world_size} needs "
                         f"{config.world_size} GPUs, this host has {torch.cuda.device_count()} (use "
                         f"--distributed-executor-backend ray to span hosts)")
    return config


def _check_model_supports_parallel(architecture: str) -> None:
    """Models that can be sharded take a `parallel` (ParallelContext) constructor argument."""
    import inspect

    from engine.models import get_model_class

    if "parallel" not in inspect.signature(get_model_class(architecture)).parameters:
        raise ValueError(f"--tensor-parallel-size / --pipeline-parallel-size: {architecture} does not support "
                         f"tensor or pipeline parallelism yet (only 1)")


def _check_model_splits(config: ParallelConfig, hf_config: Any) -> None:
    from engine.distributed.parallel_context import ParallelContext, kv_heads_of_rank, layer_range

    text = text_config(hf_config)
    sizes = {"num_attention_heads": getattr(text, "num_attention_heads", None),
             "intermediate_size": getattr(text, "intermediate_size", None)}
    tp = ParallelContext(tp_size=config.tensor_parallel_size)
    for what, size in sizes.items():
        if size is not None:
            tp.shard_size(int(size), f"the model's {what}")
    if getattr(text, "num_key_value_heads", None) is not None:
        kv_heads_of_rank(int(text.num_key_value_heads), tp)
    if getattr(text, "num_hidden_layers", None) is not None:
        layer_range(int(text.num_hidden_layers), 0, config.pipeline_parallel_size)


def _check_load_format(args: dict) -> None:
    if args["load_format"] not in LOAD_FORMATS:
        raise ValueError(f"--load-format: must be one of {', '.join(LOAD_FORMATS)}, got {args['load_format']!r}")


def _model_config(args: dict, device: str) -> ModelConfig:
    from engine.models import SUPPORTED_ARCHITECTURES, refusal_reason

    path = resolve_model_path(args["model"], args["revision"], args["trust_remote_code"],
                              download_dir=args["download_dir"])
    hf_config = apply_hf_overrides(read_hf_config(path, args["trust_remote_code"]), args["hf_overrides"])
    architecture = (getattr(hf_config, "architectures", None) or [None])[0]
    if refusal_reason(architecture) is not None:
        raise ValueError(f"--model: architecture {architecture!r} is not supported: {refusal_reason(architecture)}")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"--model: architecture {architecture!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return ModelConfig(
        model=args["model"], path=path, architecture=architecture, hf_config=hf_config,
        dtype=resolve_dtype(args["dtype"], checkpoint_dtype(hf_config), device),
        max_model_len=_max_model_len(args["max_model_len"], text_config(hf_config)),
        tokenizer=args["tokenizer"] or path, trust_remote_code=bool(args["trust_remote_code"]),
        revision=args["revision"], tokenizer_revision=args["tokenizer_revision"] or args["revision"],
        seed=int(args["seed"] or 0), max_logprobs=int(args["max_logprobs"]),
        eos_token_ids=eos_token_ids(path, hf_config), load_format=args["load_format"],
        generation_config=args["generation_config"],
        default_sampling_params=default_sampling_params(path, args["generation_config"],
                                                        args["override_generation_config"]),
    )


# generation_config.json keys vLLM takes as request defaults -> SamplingParams names.
GENERATION_DEFAULT_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def default_sampling_params(model_path: str, generation_config: str, overrides: dict | None) -> dict[str, Any]:
    """vLLM's `get_diff_sampling_param`: --generation-config auto reads the model's
    generation_config.json, vllm reads none, anything else is a folder holding one; then
    --override-generation-config on top. do_sample is ignored, as in vLLM (top_k 1 is greedy)."""
    if generation_config == "vllm":
        config: dict[str, Any] = {}
    else:
        folder = model_path if generation_config == "auto" else generation_config
        if generation_config != "auto" and not os.path.isdir(folder):
            raise ValueError(f"--generation-config: {folder!r} is not auto, vllm or a folder")
        config = _read_json_object(os.path.join(folder, "generation_config.json"), "generation-config")
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"--override-generation-config: expected a JSON object, got {type(overrides).__name__}")
    config.update(overrides or {})
    defaults = {GENERATION_DEFAULT_KEYS[key]: value for key, value in config.items()
                if key in GENERATION_DEFAULT_KEYS and value is not None}
    try:
        SamplingParams.from_optional(**defaults).validate()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--generation-config / --override-generation-config: {exc}") from None
    if defaults:
        logger.info("default sampling parameters from the model's generation config: %s (requests that leave "
                    "them unset get them; --generation-config vllm turns this off)", defaults)
    return defaults


def _read_json_object(path: str, flag: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--{flag}: cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"--{flag}: {path} holds no JSON object")
    return value


def read_hf_config(path: str, trust_remote_code: bool = False) -> Any:
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    architecture = (raw.get("architectures") or [None])[0]
    if architecture in DICT_CONFIG_READERS:
        logger.info("%s: a remote-code layout (architecture %s) read by vlserve's own code; no remote code from "
                    "the checkpoint runs, with or without --trust-remote-code", path, architecture)
        return DICT_CONFIG_READERS[architecture](path, raw)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"--model: cannot read {path}/config.json with transformers: {exc}") from exc


def apply_hf_overrides(hf_config: Any, overrides: dict | None) -> Any:
    """--hf-overrides: each key set on the HF config; a dict given for a sub-config (text_config,
    vision_config) updates that sub-config key by key, as vLLM does."""
    if overrides is None:
        return hf_config
    if not isinstance(overrides, dict):
        raise ValueError(f"--hf-overrides: expected a JSON object, got {type(overrides).__name__}")
    for key, value in overrides.items():
        current = getattr(hf_config, key, None)
        if isinstance(value, dict) and current is not None and not isinstance(current, dict):
            apply_hf_overrides(current, value)
        else:
            setattr(hf_config, key, value)
    return hf_config


def checkpoint_dtype(hf_config: Any) -> torch.dtype | None:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _max_model_len(requested: int | None, text: Any) -> int:
    limit = getattr(text, "max_position_embeddings", None)
    if requested is None:
        if limit is None:
            raise ValueError("--max-model-len: required (the model config has no max_position_embeddings)")
        return int(limit)
    if limit is not None and requested > limit:
        raise ValueError(f"--max-model-len: {requested} is larger than the model's "
                         f"max_position_embeddings ({limit})")
    return int(requested)


def eos_token_ids(path: str, hf_config: Any) -> tuple[int, ...]:
    """config eos_token_id (top level or text config) + generation_config.json's, deduplicated."""
    found: list[int] = []
    for source in (getattr(hf_config, "eos_token_id", None), getattr(text_config(hf_config), "eos_token_id", None)):
        found += _as_id_list(source)
    generation = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation):
        with open(generation) as f:
            found += _as_id_list(json.load(f).get("eos_token_id"))
    return tuple(dict.fromkeys(found))


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _cache_config(args: dict) -> CacheConfig:
    return CacheConfig(
        block_size=int(args["block_size"]), gpu_memory_utilization=float(args["gpu_memory_utilization"]),
        kv_cache_memory_bytes=args["kv_cache_memory_bytes"],
        num_gpu_blocks_override=args["num_gpu_blocks_override"],
        enable_prefix_caching=bool(args["enable_prefix_caching"]), kv_cache_dtype=args["kv_cache_dtype"],
        cpu_offload_gb=float(args["cpu_offload_gb"] or 0.0))


def _async_scheduling(args: dict, device: str) -> bool:
    """Default: on for one rank on CUDA (where it hides host time), off elsewhere; TP/PP steps are
    synchronous (their workers exchange one step at a time)."""
    world_size = int(args["tensor_parallel_size"]) * int(args["pipeline_parallel_size"])
    requested = args["async_scheduling"]
    if requested and world_size > 1:
        raise ValueError("--async-scheduling: not supported with tensor or pipeline parallelism yet")
    if requested is None:
        return device.startswith("cuda") and world_size == 1
    return bool(requested)


def _scheduler_config(args: dict, max_model_len: int, device: str) -> SchedulerConfig:
    chunked = bool(args["enable_chunked_prefill"])
    batched = args["max_num_batched_tokens"]
    if batched is None:
        batched = DEFAULT_MAX_NUM_BATCHED_TOKENS if chunked else max(max_model_len, DEFAULT_MAX_NUM_BATCHED_TOKENS)
    return SchedulerConfig(max_num_seqs=int(args["max_num_seqs"]), max_num_batched_tokens=int(batched),
                           enable_chunked_prefill=chunked, max_model_len=max_model_len,
                           async_scheduling=_async_scheduling(args, device))


def _multimodal_config(args: dict) -> MultiModalConfig:
    from vision.limits import MultiModalLimits

    limits = MultiModalLimits.parse(args["limit_mm_per_prompt"])
    return MultiModalConfig(limit_per_prompt=limits.limit_per_prompt(), limit_sizes=limits.limit_sizes(),
                            mm_processor_kwargs=dict(args["mm_processor_kwargs"] or {}),
                            encoder_cache_size=args["encoder_cache_size"],
                            media_io_kwargs=dict(args["media_io_kwargs"] or {}),
                            mm_processor_cache_gb=float(args["mm_processor_cache_gb"]))
