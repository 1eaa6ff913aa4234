"""EngineConfig from vLLM's LLM(...) / CLI keyword names: resolve the checkpoint, read its HF
config and generation config, check what we support, and fill the frozen config dataclasses.

Caller: `EngineConfig.create(**kwargs)` (engine.config). All file I/O of configuration is here.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch

from engine.config import (CacheConfig, DeviceConfig, EngineConfig, ModelConfig, MultiModalConfig,
                           ParallelConfig, SchedulerConfig, resolve_device, resolve_dtype)
from engine.structured_output.config import StructuredOutputsConfig
from engine.weights import resolve_model_path

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
    "enforce_eager": False, "deterministic": True,
    "limit_mm_per_prompt": None, "mm_processor_kwargs": None, "encoder_cache_size": None,
    "structured_outputs_config": None,
}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192

# Architectures whose config.json transformers cannot read without remote code (the original
# InternVL layout): architecture -> reader(path, raw config dict) -> config object.
# Accepted only with --trust-remote-code (vLLM's rule), although no remote code is ever run.
DICT_CONFIG_READERS: dict[str, Callable[[str, dict], Any]] = {
    "InternVLChatModel": lambda path, raw: _internvl_chat_reader()(path, raw),
}


def _internvl_chat_reader() -> Callable[[str, dict], Any]:
    from engine.models.internvl import read_internvl_chat_config

    return read_internvl_chat_config


def build_engine_config(**kwargs: Any) -> EngineConfig:
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
        scheduler_config=_scheduler_config(args, model_config.max_model_len),
        parallel_config=_parallel_config(args, model_config, device),
        device_config=DeviceConfig(device=device, enforce_eager=bool(args["enforce_eager"]),
                                   deterministic=bool(args["deterministic"])),
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

    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
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
    from engine.models import SUPPORTED_ARCHITECTURES

    path = resolve_model_path(args["model"], args["revision"], args["trust_remote_code"])
    hf_config = read_hf_config(path, args["trust_remote_code"])
    architecture = (getattr(hf_config, "architectures", None) or [None])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"--model: architecture {architecture!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return ModelConfig(
        model=args["model"], path=path, architecture=architecture, hf_config=hf_config,
        dtype=resolve_dtype(args["dtype"], checkpoint_dtype(hf_config), device),
        max_model_len=_max_model_len(args["max_model_len"], text_config),
        tokenizer=args["tokenizer"] or path, trust_remote_code=bool(args["trust_remote_code"]),
        revision=args["revision"], seed=int(args["seed"] or 0),
        eos_token_ids=eos_token_ids(path, hf_config), load_format=args["load_format"],
    )


def read_hf_config(path: str, trust_remote_code: bool = False) -> Any:
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    architecture = (raw.get("architectures") or [None])[0]
    if architecture in DICT_CONFIG_READERS:
        if not trust_remote_code:
            raise ValueError(f"--model: {path} is a remote-code checkpoint (architecture {architecture}); add "
                             f"--trust-remote-code to load it (its weights are mapped, its Python is never run)")
        return DICT_CONFIG_READERS[architecture](path, raw)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"--model: cannot read {path}/config.json with transformers: {exc}") from exc


def checkpoint_dtype(hf_config: Any) -> torch.dtype | None:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _max_model_len(requested: int | None, text_config: Any) -> int:
    limit = getattr(text_config, "max_position_embeddings", None)
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
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else None
    for source in (getattr(hf_config, "eos_token_id", None), getattr(text_config, "eos_token_id", None)):
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


def _scheduler_config(args: dict, max_model_len: int) -> SchedulerConfig:
    chunked = bool(args["enable_chunked_prefill"])
    batched = args["max_num_batched_tokens"]
    if batched is None:
        batched = DEFAULT_MAX_NUM_BATCHED_TOKENS if chunked else max(max_model_len, DEFAULT_MAX_NUM_BATCHED_TOKENS)
    return SchedulerConfig(max_num_seqs=int(args["max_num_seqs"]), max_num_batched_tokens=int(batched),
                           enable_chunked_prefill=chunked, max_model_len=max_model_len)


def _multimodal_config(args: dict) -> MultiModalConfig:
    from vision.limits import MultiModalLimits

    limits = MultiModalLimits.parse(args["limit_mm_per_prompt"])
    return MultiModalConfig(limit_per_prompt=limits.limit_per_prompt(), limit_sizes=limits.limit_sizes(),
                            mm_processor_kwargs=dict(args["mm_processor_kwargs"] or {}),
                            encoder_cache_size=args["encoder_cache_size"])
