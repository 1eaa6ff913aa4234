"""How many KV-cache blocks fit: bytes per block from the model shape, and the memory left for
the cache (CPU: --kv-cache-memory-bytes, or max_num_seqs requests of max_model_len capped by the
available memory; GPU: measured after a profiling forward at the largest batch, the vision tower's
largest media batch included), after the encoder cache's share.

Callers: ModelRunner.num_blocks_for_memory (the KV plan, printed in tokens and requests) and
EngineCore (`plan_encoder`: the encoder cache size the scheduler budgets with).

The encoder plan: the largest item the limits admit (--limit-mm-per-prompt counts and sizes, the
processor's pixel bounds with --mm-processor-kwargs), in embedding rows, capped by max_model_len;
the encoder cache holds max(max_num_batched_tokens, that item) rows of the LM's hidden size (as
vLLM), which is also the rows one step may encode; the profile encodes as many largest items as
one step may (at least one).
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

from engine.config import EngineConfig, text_config
from vision.processors import PROCESSORS, MediaProcessor, get_processor
from vision.video import FPS_MAX_FRAMES

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
class EncoderPlan:
    modality: str                      # of the largest admissible item
    item_size: tuple[int, int, int]    # its (height, width, num_frames) before processing
    max_tokens_per_item: int           # its embedding rows (placeholder tokens), at most max_model_len
    num_items_per_step: int            # largest items one step may encode (the profile's tower batch)
    cache_size: int                    # rows the encoder cache holds = rows one step may encode
    bytes_per_row: int                 # LM hidden size x dtype size

    @property
    def cache_bytes(self) -> int:
        return self.cache_size * self.bytes_per_row


@dataclass(frozen=True)
class MemoryPlan:
    num_blocks: int
    bytes_per_block: int
    weights_bytes: int = 0
    peak_activation_bytes: int = 0     # the profile's peak over the weights (LM step and tower batch)
    tower_peak_bytes: int = 0          # of which the tower's largest media batch needed alone
    encoder_cache_bytes: int = 0       # reserved for the encoder cache (EncoderPlan.cache_bytes)
    sized_by: str = ""  # how the size was chosen, for the start-up plan

    def describe(self, block_size: int, max_model_len: int) -> str:
        tokens = self.num_blocks * block_size
        gib = self.num_blocks * self.bytes_per_block / (1 << 30)
        vision = (f"; vision tower: peak {self.tower_peak_bytes / (1 << 30):.2f} GiB on its largest media batch, "
                  f"encoder cache {self.encoder_cache_bytes / (1 << 30):.2f} GiB"
                  if self.tower_peak_bytes or self.encoder_cache_bytes else "")
        return (f"KV cache: {self.num_blocks} blocks x {block_size} = {tokens} tokens ({gib:.2f} GiB), "
                f"{tokens / max_model_len:.2f}x requests at max_model_len {max_model_len}; "
                f"weights {self.weights_bytes / (1 << 30):.2f} GiB, "
                f"activation peak {self.peak_activation_bytes / (1 << 30):.2f} GiB{vision}"
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


def kv_cache_budget(total: int, utilization: float, peak: int, non_torch: int, encoder_cache_bytes: int) -> int:
    """Bytes left for the KV cache: utilization x total, less the profile's peak (weights +
    activations, tower included), memory outside torch's allocator and the encoder cache."""
    return int(total * utilization) - peak - max(non_torch, 0) - encoder_cache_bytes


def plan_gpu(config: EngineConfig, shape: KVCacheShape, profile_run: Callable[[], int],
             encoder: EncoderPlan | None = None) -> MemoryPlan:
    """Run the largest step once (profile_run returns the tower batch's own peak, 0 without one),
    then give the KV cache what is left (kv_cache_budget)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    weights_bytes = torch.cuda.memory_allocated()
    free_before, total = torch.cuda.mem_get_info()
    torch.cuda.reset_peak_memory_stats()
    tower_peak = profile_run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.empty_cache()
    free_after, _ = torch.cuda.mem_get_info()
    # Memory used outside torch's allocator (CUDA context, NCCL, cuBLAS workspaces).
    non_torch = (total - free_after) - torch.cuda.memory_reserved()
    cache_bytes = encoder.cache_bytes if encoder is not None else 0
    if config.cache_config.kv_cache_memory_bytes is not None:
        budget = config.cache_config.kv_cache_memory_bytes
    else:
        budget = kv_cache_budget(total, config.cache_config.gpu_memory_utilization, peak, non_torch, cache_bytes)
    if budget < shape.bytes_per_block:
        raise ValueError(f"--gpu-memory-utilization: {config.cache_config.gpu_memory_utilization} leaves no "
                         f"room for the KV cache (weights {weights_bytes >> 20} MiB, peak {peak >> 20} MiB "
                         f"(vision tower {tower_peak >> 20} MiB), encoder cache {cache_bytes >> 20} MiB, "
                         f"total {total >> 20} MiB)")
    return MemoryPlan(num_blocks=budget // shape.bytes_per_block, bytes_per_block=shape.bytes_per_block,
                      weights_bytes=weights_bytes, peak_activation_bytes=peak - weights_bytes,
                      tower_peak_bytes=tower_peak, encoder_cache_bytes=cache_bytes)


# Aspect ratios tried for the largest image: a:b for a, b in 1..16 at a side unit larger than any
# pixel bound, so that Qwen's max_pixels and InternVL's tile grids (up to max_num tiles) both bind.
_ASPECTS = [(a, b) for a in range(1, 17) for b in range(1, 17)]
_SIDE_UNIT = 4096


def encoder_plan(config: EngineConfig) -> EncoderPlan | None:
    """plan_encoder with the server's processor (--mm-processor-kwargs); None for a text model."""
    model_config = config.model_config
    if model_config.architecture not in PROCESSORS:
        return None
    processor = get_processor(model_config.path, model_config.hf_config,
                              config.multimodal_config.mm_processor_kwargs or None)
    return plan_encoder(config, processor)


def largest_image_size(processor: MediaProcessor, plan: EncoderPlan) -> tuple[int, int]:
    """(height, width) of an image with as many rows as the plan's largest item allows (the tower
    profile's input; a video's rows are profiled as an image of as many rows), at the smallest
    scale of the item's aspect ratio that still yields them, so the dummy image stays small."""
    height, width = plan.item_size[:2] if plan.modality == "image" else (_SIDE_UNIT, _SIDE_UNIT)
    sizes = [(max(1, height * k // 64), max(1, width * k // 64)) for k in range(1, 65)]   # scales 1/64 .. 1
    ranked = [(processor.num_tokens_for_size("image", h, w), -h * w, (h, w)) for h, w in sizes]
    admitted = [entry for entry in ranked if entry[0] <= plan.max_tokens_per_item] or ranked[:1]
    return max(admitted)[2]   # the most rows, then the smallest area


def plan_encoder(config: EngineConfig, processor: MediaProcessor) -> EncoderPlan:
    """The encoder cache and profile batch for the largest item the limits admit."""
    candidates = []
    for modality in ("image", "video"):
        if config.multimodal_config.max_items(modality) > 0:
            candidates += [(processor.num_tokens_for_size(modality, *size), modality, size)
                           for size in _item_sizes(config, processor, modality)]
    if not candidates:  # every modality limited to 0: nothing is ever encoded
        candidates = [(1, "image", (1, 1, 1))]
    tokens, modality, size = max(candidates, key=lambda c: (c[0], -c[2][0] * c[2][1]))  # then the smallest
    max_model_len = config.model_config.max_model_len
    max_tokens_per_item = min(tokens, max_model_len)
    explicit = config.multimodal_config.encoder_cache_size
    cache_size = explicit if explicit is not None else max(config.scheduler_config.max_num_batched_tokens,
                                                           max_tokens_per_item)
    text = text_config(config.model_config.hf_config)
    element = torch.empty((), dtype=config.model_config.dtype).element_size()
    return EncoderPlan(modality=modality, item_size=size, max_tokens_per_item=max_tokens_per_item,
                       num_items_per_step=max(1, cache_size // max_tokens_per_item), cache_size=cache_size,
                       bytes_per_row=int(text.hidden_size) * element)


def _item_sizes(config: EngineConfig, processor: MediaProcessor, modality: str) -> list[tuple[int, int, int]]:
    """(height, width, num_frames) candidates: the size object of --limit-mm-per-prompt when
    given, else every _ASPECTS ratio; videos at the frame count the limits or sampling allow."""
    bounds = config.multimodal_config.limit_sizes.get(modality, {})
    num_frames = 1
    if modality == "video":
        sampling = processor.video_sampling_kwargs(None)
        num_frames = int(bounds.get("num_frames") or sampling.get("nframes") or sampling.get("max_frames")
                         or FPS_MAX_FRAMES)
    if "width" in bounds and "height" in bounds:
        return [(int(bounds["height"]), int(bounds["width"]), num_frames)]
    return [(_SIDE_UNIT * a, _SIDE_UNIT * b, num_frames) for a, b in _ASPECTS]

