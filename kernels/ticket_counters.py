"""Per-device int32 ticket counters for kernels whose last-finishing program does a fixed-order
reduction (split-K sums in kernels/matmul.py, split-KV merges in kernels/paged_attention.py).

Every counter is zero between launches: the program that draws a tile's last ticket resets it.
Launches sharing a buffer must not overlap in time (the engine runs them on one stream). A CUDA
graph keeps the buffer's address, so growing never frees the old buffer (kept in `retired`) and
is refused while a graph is being captured: the engine runs every shape eagerly before capturing.
"""

from __future__ import annotations

import torch
import triton


class TicketCounters:
    def __init__(self, owner: str, minimum: int):
        self.owner = owner          # named in the capture error
        self.minimum = minimum      # smallest buffer allocated
        self.buffers: dict[torch.device, torch.Tensor] = {}
        self.retired: list[torch.Tensor] = []

    def get(self, device: torch.device, count: int) -> torch.Tensor:
        """[>= count] int32 zeros on `device`, allocated once and grown eagerly."""
        counters = self.buffers.get(device)
        if counters is not None and counters.numel() >= count:
            return counters
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{self.owner} needs {count} ticket counters on {device} while a CUDA graph is "
                               "being captured; run the same shapes eagerly once before capturing")
        if counters is not None:
            self.retired.append(counters)
        counters = torch.zeros(max(self.minimum, triton.next_power_of_2(count)), dtype=torch.int32, device=device)
        self.buffers[device] = counters
        return counters
