"""How many KV-cache blocks fit: bytes per block from the model shape, and the memory left for
the cache (CPU: --kv-cache-memory-bytes, or max_num_seqs requests of max_model_len capped by the
available memory; GPU: measured after a profiling forward at the largest batch).

Caller: ModelRunner.num_blocks_for_memory. It also prints the plan in tokens and requests.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from engine.config import EngineConfig

logger = logging.getLogger(__name__)

# CPU default: the KV cache may take at most this fraction of the memory available at start-up
# (the rest is for activations, the vision tower's peak, the server process and the rest of the machine).
CPU_AVAILABLE_MEMORY_FRACTION = 0.5


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
    sized_by: str = ""  # how the size was chosen, for the start-up plan

    def describe(self, block_size: int, max_model_len: int) -> str:
        tokens = self.num_blocks * block_size
        gib = self.num_blocks * self.bytes_per_block / (1 << 30)
        return (f"KV cache: {self.num_blocks} blocks x {block_size} = {tokens} tokens ({gib:.2f} GiB), "
                f"{tokens / max_model_len:.2f}x requests at max_model_len {max_model_len}; "
                f"weights {self.weights_bytes / (1 << 30):.2f} GiB, "
                f"activation peak {self.peak_activation_bytes / (1 << 30):.2f} GiB"
                + (f"; sized by {self.sized_by}" if self.sized_by else ""))


def plan_cpu(config: EngineConfig, shape: KVCacheShape, available_bytes: int | None = None) -> MemoryPlan:
    """--kv-cache-memory-bytes when given; else room for max_num_seqs requests of max_model_len
    (+ the null block), capped at CPU_AVAILABLE_MEMORY_FRACTION of the available memory.
    --gpu-memory-utilization has no meaning here: there is no device memory to take a fraction of."""
    requested = config.cache_config.kv_cache_memory_bytes
    if requested is not None:
        return MemoryPlan(num_blocks=requested // shape.bytes_per_block, bytes_per_block=shape.bytes_per_block,
                          sized_by=f"--kv-cache-memory-bytes {requested}")
    max_model_len, max_num_seqs = config.model_config.max_model_len, config.scheduler_config.max_num_seqs
    wanted = max_num_seqs * math.ceil(max_model_len / shape.block_size) + 1
    available = available_memory_bytes() if available_bytes is None else available_bytes
    cap = int(available * CPU_AVAILABLE_MEMORY_FRACTION) // shape.bytes_per_block
    sized_by = (f"--max-num-seqs {max_num_seqs} x --max-model-len {max_model_len}" if wanted <= cap else
                f"{CPU_AVAILABLE_MEMORY_FRACTION:.0%} of the available {available / (1 << 30):.1f} GiB "
                f"(--max-num-seqs {max_num_seqs} x --max-model-len {max_model_len} would need "
                f"{wanted * shape.bytes_per_block / (1 << 30):.1f} GiB)")
    return MemoryPlan(num_blocks=min(wanted, cap), bytes_per_block=shape.bytes_per_block,
                      sized_by=sized_by + "; --kv-cache-memory-bytes sets it (--gpu-memory-utilization is GPU only)")


def available_memory_bytes() -> int:
    """Memory this process may still take: /proc/meminfo's MemAvailable, lowered by a cgroup v2 limit."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroup = Path("/sys/fs/cgroup")
    limit_text = (cgroup / "memory.max").read_text().strip() if (cgroup / "memory.max").exists() else "max"
    if limit_text != "max":
        used = int((cgroup / "memory.current").read_text())
        available = min(available, int(limit_text) - used)
    return available


def zeroed_host_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor on an anonymous mapping: the kernel supplies zero pages on first write, so a
    large KV cache costs resident memory as blocks fill, not at start-up (and no memset of gigabytes)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


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
