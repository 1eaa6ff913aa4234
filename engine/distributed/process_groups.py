"""Join the torch.distributed world as one rank and build its tensor-parallel group.

Caller: engine.executor.worker.Worker, once per worker process / Ray actor, before the model is
built. Backend: gloo on the CPU, NCCL on GPUs. Every rank creates every TP group (new_group is a
collective over the whole world), then keeps its own in the ParallelContext it returns.
"""

from __future__ import annotations

import datetime

import torch.distributed as dist

from engine.distributed.parallel_context import ParallelContext

# A peer that stops answering (killed, hung) turns into an error on the others after this long;
# the executor normally notices a dead worker long before, from its process or actor.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


def init_distributed(rank: int, tp_size: int, pp_size: int, init_method: str, device: str) -> ParallelContext:
    """init_method: "tcp://host:port" of rank 0. -> this rank's ParallelContext."""
    world_size = tp_size * pp_size
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    pp_rank, tp_rank = divmod(rank, tp_size)
    tp_group = None
    for stage in range(pp_size):
        group = dist.new_group([stage * tp_size + t for t in range(tp_size)]) if tp_size > 1 else None
        if stage == pp_rank:
            tp_group = group
    return ParallelContext(tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp_rank, pp_size=pp_size, tp_group=tp_group)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
