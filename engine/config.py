"""Engine configuration: one frozen dataclass per concern, validated once, aggregated by
EngineConfig. Built once (by `LLM(...)` or `app.server`) with
`engine.config_loader.create_engine_config(**kwargs)` and passed down; nothing reads flags or
environment variables after that.

`__post_init__` only validates (ValueError naming the flag); reading the HF config is I/O and lives
in engine.config_loader, which imports this module (never the other way).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.structured_output.config import StructuredOutputsConfig

_DTYPES = {
    "float32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16,
}


def _require(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise ValueError(f"--{flag.replace('_', '-')}: {message}")


@dataclass(frozen=True)
class ModelConfig:
    model: str                 # what the user named (hub id or path); also the default served name
    path: str                  # resolved local directory holding config.json and the weights
    architecture: str          # HF `architectures[0]`
    hf_config: Any             # transformers PretrainedConfig (or dict-backed for remote-code layouts)
    dtype: torch.dtype
    max_model_len: int
    tokenizer: str             # directory or hub id of the tokenizer
    trust_remote_code: bool = False
    revision: str | None = None
    tokenizer_revision: str | None = None
    seed: int = 0
    # --max-logprobs: the most top logprobs a request may ask for (-1: the vocabulary size).
    max_logprobs: int = 20
    # Token ids that end generation (config eos + generation_config eos).
    eos_token_ids: tuple[int, ...] = ()
    # "auto"/"safetensors": read the checkpoint; "dummy": random weights made on the device.
    load_format: str = "auto"
    # --generation-config: "auto" (the model's generation_config.json), "vllm" (none) or a folder.
    generation_config: str = "auto"
    # What requests that leave a field unset get (read from the generation config, then
    # --override-generation-config on top): vLLM's names temperature, top_p, top_k, min_p,
    # repetition_penalty and max_tokens (from max_new_tokens).
    default_sampling_params: dict[str, Any] = field(default_factory=dict)

    def get_diff_sampling_param(self) -> dict[str, Any]:
        """vLLM's name: the sampling defaults that differ from vLLM's own (a copy)."""
        return dict(self.default_sampling_params)

    def __post_init__(self) -> None:
        _require(self.load_format in ("auto", "safetensors", "dummy"), "load_format",
                 f"must be auto, safetensors or dummy, got {self.load_format!r}")
        _require(self.max_model_len >= 1, "max_model_len", f"must be positive, got {self.max_model_len}")
        _require(self.max_logprobs >= -1, "max_logprobs", f"must be -1 or at least 0, got {self.max_logprobs}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    # Bytes of KV cache (vLLM's flag; wins over gpu_memory_utilization). None on the CPU: room for
    # max_num_seqs requests of max_model_len, capped by the available memory (runner/memory_plan.py).
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    cpu_offload_gb: float = 0.0

    def __post_init__(self) -> None:
        _require(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size",
                 f"must be a power of two up to 128, got {self.block_size}")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
                 f"must be in (0, 1], got {self.gpu_memory_utilization}")
        _require(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
                 "num_gpu_blocks_override", "must be positive")
        _require(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
                 "kv_cache_memory_bytes", "must be positive")
        _require(self.kv_cache_dtype == "auto", "kv_cache_dtype",
                 f"only 'auto' (the model dtype) is supported, got {self.kv_cache_dtype!r}")
        _require(self.cpu_offload_gb == 0, "cpu_offload_gb",
                 f"weight offloading is not supported, got {self.cpu_offload_gb}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    max_model_len: int = 8192  # copy of ModelConfig's, for the scheduler's checks
    # Schedule and launch step N+1 while step N runs on the device (vLLM's async scheduling):
    # the host's scheduling, input preparation and output handling overlap the GPU's work.
    # Requests that need step N's token on the host before step N+1 (penalties) run synchronously.
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, "max_num_seqs", f"must be positive, got {self.max_num_seqs}")
        _require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
                 f"must be positive, got {self.max_num_batched_tokens}")
        _require(self.enable_chunked_prefill or self.max_num_batched_tokens >= self.max_model_len,
                 "max_num_batched_tokens",
                 "must be at least --max-model-len when chunked prefill is disabled")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # "uni" (one rank in the core's process), "mp" (a process per rank), "ray" (a Ray actor per
    # rank); None: uni for one rank, else chosen by engine.config_loader.
    distributed_executor_backend: str | None = None
    # The vision tower under TP: "data" = replicated, a step's images split across the ranks.
    # ("weights", a sharded tower, is not implemented.)
    mm_encoder_tp_mode: str = "data"

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be positive")
        _require(self.pipeline_parallel_size >= 1, "pipeline_parallel_size", "must be positive")
        _require(self.distributed_executor_backend in (None, "uni", "mp", "ray"), "distributed_executor_backend",
                 f"must be uni, mp or ray, got {self.distributed_executor_backend!r}")
        _require(self.distributed_executor_backend != "uni" or self.world_size == 1, "distributed_executor_backend",
                 f"uni runs one rank, but tensor x pipeline parallel size is {self.world_size} (use mp or ray)")
        _require(self.mm_encoder_tp_mode != "weights", "mm_encoder_tp_mode",
                 "weights (a sharded vision tower) is not supported; use data (the tower is replicated "
                 "on every rank and a step's images are split across them)")
        _require(self.mm_encoder_tp_mode == "data", "mm_encoder_tp_mode",
                 f"must be data, got {self.mm_encoder_tp_mode!r}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "cpu"          # resolved: "cpu" or "cuda"
    enforce_eager: bool = False  # no CUDA graphs
    deterministic: bool = True   # batch-invariant numerics (same tokens whatever the batch)
    # Steps with prompt rows up to this many tokens replay CUDA graphs (engine/runner/mixed_graphs.py); 0: eager.
    mixed_graph_max_tokens: int = 1024

    def __post_init__(self) -> None:
        _require(self.device in ("cpu", "cuda"), "device", f"must be cpu or cuda, got {self.device!r}")
        _require(self.mixed_graph_max_tokens >= 0, "mixed_graph_max_tokens",
                 f"must be >= 0, got {self.mixed_graph_max_tokens}")


# --media-io-kwargs keys per modality (vLLM's VideoMediaIO arguments that mean something here).
MEDIA_IO_KEYS = {"video": {"num_frames", "fps"}}


@dataclass(frozen=True)
class MultiModalConfig:
    # modality -> max items per prompt; a missing modality means vLLM's default (999).
    limit_per_prompt: dict[str, int] = field(default_factory=dict)
    # modality -> size bounds from the object form: {"width", "height"} / {"num_frames"}.
    limit_sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    # Vision-embedding rows the encoder cache may hold; None: derived from the limits.
    encoder_cache_size: int | None = None
    # --media-io-kwargs: modality -> media loading settings ({"video": {"num_frames": 8}}).
    media_io_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # --mm-processor-cache-gb: vLLM's cache of processor outputs. Accepted, no effect: the
    # processors here are cheap and the encoder cache already keys on content (README).
    mm_processor_cache_gb: float = 4.0

    def __post_init__(self) -> None:
        for modality, settings in self.media_io_kwargs.items():
            allowed = MEDIA_IO_KEYS.get(modality)
            _require(allowed is not None, "media_io_kwargs", f"unknown modality {modality!r} (supported: video)")
            _require(isinstance(settings, dict) and set(settings) <= allowed, "media_io_kwargs",
                     f"{modality}: expected an object with keys among {sorted(allowed)}, got {settings!r}")
        _require(self.mm_processor_cache_gb >= 0, "mm_processor_cache_gb",
                 f"must be non-negative, got {self.mm_processor_cache_gb}")
        for modality, count in self.limit_per_prompt.items():
            _require(modality in ("image", "video"), "limit_mm_per_prompt",
                     f"unknown modality {modality!r} (supported: image, video)")
            _require(count >= 0, "limit_mm_per_prompt", f"{modality} count must be >= 0, got {count}")

    def max_items(self, modality: str) -> int:
        return self.limit_per_prompt.get(modality, 999)


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig
    device_config: DeviceConfig
    multimodal_config: MultiModalConfig
    structured_outputs_config: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


def text_config(hf_config: Any) -> Any:
    """The language model's part of an HF config (the config itself for text-only models); the
    InternVL original-layout reader offers the same method."""
    return hf_config.get_text_config()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    _require(device in ("cpu", "cuda"), "device", f"must be auto, cpu or cuda, got {device!r}")
    _require(device != "cuda" or torch.cuda.is_available(), "device", "cuda asked for but no GPU is visible")
    return device


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if checkpoint_dtype in (torch.float32, torch.bfloat16, torch.float16):
            # float16 on the CPU is slow and inexact; vLLM's CPU backend does the same.
            return torch.float32 if (device == "cpu" and checkpoint_dtype == torch.float16) else checkpoint_dtype
        return torch.bfloat16 if device == "cuda" else torch.float32
    _require(dtype in _DTYPES, "dtype", f"must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return _DTYPES[dtype]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
