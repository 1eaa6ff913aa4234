"""Host-to-device copies that never wait for the GPU. Callers: engine.runner.input_batch (a step's
inputs) and engine.runner.encoder_runner (media pixels).

A copy from pageable host memory blocks the host until the device has executed everything queued
before it: with async scheduling that is the whole previous step, so preparing step N+1 would wait
for step N. Staged through pinned memory (PyTorch's caching host allocator keeps the staging
buffer alive until the copy has run), the copy is queued and the host goes on.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`, without waiting for work already queued there."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
