"""CPU KV-cache sizing: --kv-cache-memory-bytes, else max_num_seqs x max_model_len capped by the
available memory; and the lazily committed zero tensor that holds the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.config_loader import create_engine_config
from engine.runner.memory_plan import (
    CPU_AVAILABLE_MEMORY_FRACTION, KVCacheShape, available_memory_bytes, plan_cpu, zeroed_host_tensor,
)

# The tiny qwen2 LM: 3 layers, 2 KV heads of 16, float32; k+v -> 2*3*16*2*16*4 bytes per 16-token block.
SHAPE = KVCacheShape(num_layers=3, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32)
BYTES_PER_BLOCK = 12288
PLENTY = 1 << 40


@pytest.fixture(scope="module")
def qwen2(tiny_model_dir) -> str:
    return str(tiny_model_dir("qwen2"))


def config(model: str, **kwargs) -> EngineConfig:
    return create_engine_config(model=model, dtype="float32", device="cpu", **kwargs)


def test_bytes_per_block_is_hand_computed():
    assert SHAPE.bytes_per_block == BYTES_PER_BLOCK


def test_kv_cache_memory_bytes_sets_the_size(qwen2):
    plan = plan_cpu(config(qwen2, kv_cache_memory_bytes=BYTES_PER_BLOCK * 100 + 7), SHAPE, available_bytes=1)
    assert plan.num_blocks == 100
    assert "--kv-cache-memory-bytes" in plan.describe(16, 8192)


def test_default_holds_max_num_seqs_requests_of_max_model_len(qwen2):
    plan = plan_cpu(config(qwen2, max_model_len=1000, max_num_seqs=5), SHAPE, available_bytes=PLENTY)
    assert plan.num_blocks == 5 * 63 + 1  # ceil(1000 / 16) = 63 blocks a request, + the null block
    assert "--max-num-seqs 5 x --max-model-len 1000" in plan.describe(16, 1000)


def test_default_is_capped_by_available_memory(qwen2):
    available = 10_000 * BYTES_PER_BLOCK
    plan = plan_cpu(config(qwen2, max_model_len=8192, max_num_seqs=256), SHAPE, available_bytes=available)
    assert plan.num_blocks == int(available * CPU_AVAILABLE_MEMORY_FRACTION) // BYTES_PER_BLOCK == 5000
    assert "of the available" in plan.sized_by and "--kv-cache-memory-bytes" in plan.sized_by


def test_available_memory_is_positive_and_below_the_machine_total():
    total = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < available_memory_bytes() <= total


def rss_bytes() -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_zeroed_host_tensor_is_zero_and_commits_memory_only_when_written():
    size = 256 << 20
    before = rss_bytes()
    tensor = zeroed_host_tensor((2, size // 8), torch.float32)
    assert rss_bytes() - before < 16 << 20
    assert tensor.shape == (2, size // 8) and tensor.is_contiguous() and not tensor.any()
    tensor.fill_(1.0)
    assert rss_bytes() - before > size * 0.9
    assert tensor.sum().item() == size // 4
