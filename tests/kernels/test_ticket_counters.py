"""kernels/ticket_counters.py: zeroed int32 buffers per device that only grow, keeping the old
buffer alive (a CUDA graph captured before the growth still points at it)."""

from __future__ import annotations

import torch

from vlserve_kernels.ticket_counters import TicketCounters


def test_grows_to_a_power_of_two_and_keeps_the_old_buffer():
    counters, cpu = TicketCounters("test", minimum=16), torch.device("cpu")
    first = counters.get(cpu, 10)
    assert first.dtype == torch.int32 and first.numel() == 16 and not first.any()
    assert counters.get(cpu, 16) is first
    grown = counters.get(cpu, 17)
    assert grown.numel() == 32 and not grown.any()
    assert counters.retired == [first] and counters.buffers[cpu] is grown


def test_matmul_and_attention_use_their_own_buffers():
    import importlib

    matmul = importlib.import_module("vlserve_kernels.matmul")
    paged_attention = importlib.import_module("vlserve_kernels.paged_attention")   # the package's name is the function
    assert matmul.TILE_COUNTERS is not paged_attention.TICKETS
    assert matmul.TILE_COUNTERS.minimum == 1 << 16 and paged_attention.TICKETS.minimum == 1024
