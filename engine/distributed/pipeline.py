"""Pipeline-parallel transfers: a stage's output (hidden, residual) goes to the next stage.

Caller: engine.runner.model_runner, around the model forward, when pp_size > 1. Every rank builds
the same step batch from the same SchedulerOutput, so the receiver knows the shape [T, H] without
a handshake. Each TP rank talks to the rank with the same tp_rank in the neighbouring stage; the
hidden state is replicated across a TP group, so each pair moves a full copy.

This is the synchronous pipeline: one step's batch passes the stages in turn and the stages do not
overlap (no micro-batches in flight; that needs a scheduler that keeps pp_size batches going).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from engine.distributed.parallel_context import ParallelContext

IntermediateTensors = tuple[torch.Tensor, torch.Tensor]   # (hidden [T, H], residual [T, H])


def send_to_next_stage(parallel: ParallelContext, intermediate: IntermediateTensors) -> None:
    hidden, residual = intermediate
    dist.send(torch.stack([hidden, residual]).contiguous(), dst=parallel.next_stage_rank)  # [2, T, H]


def recv_from_prev_stage(parallel: ParallelContext, num_tokens: int, hidden_size: int, dtype: torch.dtype,
                         device: torch.device) -> IntermediateTensors:
    buffer = torch.empty(2, num_tokens, hidden_size, dtype=dtype, device=device)   # [2, T, H]
    dist.recv(buffer, src=parallel.prev_stage_rank)
    return buffer[0], buffer[1]
