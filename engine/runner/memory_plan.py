"""How many KV-cache blocks fit: bytes per block from the model shape, and the memory left for
the cache (CPU: a byte budget; GPU: measured after a profiling forward at the largest batch).

Caller: ModelRunner.num_blocks_for_memory. It also prints the plan in tokens and requests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from engine.config import EngineConfig

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 4 << 30


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element


@dataclass(frozen=True)
class MemoryPlan:
    num_blocks: int
    bytes_per_block: int
    weights_bytes: int = 0
    peak_activation_bytes: int = 0

    def describe(self, block_size: int, max_model_len: int) -> str:
        tokens = self.num_blocks * block_size
        gib = self.num_blocks * self.bytes_per_block / (1 << 30)
        return (f"KV cache: {self.num_blocks} blocks x {block_size} = {tokens} tokens ({gib:.2f} GiB), "
                f"{tokens / max_model_len:.2f}x requests at max_model_len {max_model_len}; "
                f"weights {self.weights_bytes / (1 << 30):.2f} GiB, "
                f"activation peak {self.peak_activation_bytes / (1 << 30):.2f} GiB")


def plan_cpu(config: EngineConfig, shape: KVCacheShape) -> MemoryPlan:
    budget = config.cache_config.kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES
    return MemoryPlan(num_blocks=budget // shape.bytes_per_block, bytes_per_block=shape.bytes_per_block)


def plan_gpu(config: EngineConfig, shape: KVCacheShape, profile_run: Callable[[], None]) -> MemoryPlan:
    """Run the largest step once, then give the KV cache what is left of
    gpu_memory_utilization * total after the weights, that peak and non-torch allocations."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    weights_bytes = torch.cuda.memory_allocated()
    free_before, total = torch.cuda.mem_get_info()
    torch.cuda.reset_peak_memory_stats()
    profile_run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.empty_cache()
    free_after, _ = torch.cuda.mem_get_info()
    # Memory used outside torch's allocator (CUDA context, NCCL, cuBLAS workspaces).
    non_torch = (total - free_after) - torch.cuda.memory_reserved()
    if config.cache_config.kv_cache_memory_bytes is not None:
        budget = config.cache_config.kv_cache_memory_bytes
    else:
        budget = int(total * config.cache_config.gpu_memory_utilization) - peak - max(non_torch, 0)
    if budget < shape.bytes_per_block:
        raise ValueError(f"--gpu-memory-utilization: {config.cache_config.gpu_memory_utilization} leaves no "
                         f"room for the KV cache (weights {weights_bytes >> 20} MiB, peak {peak >> 20} MiB, "
                         f"total {total >> 20} MiB)")
    return MemoryPlan(num_blocks=budget // shape.bytes_per_block, bytes_per_block=shape.bytes_per_block,
                      weights_bytes=weights_bytes, peak_activation_bytes=peak - weights_bytes)
