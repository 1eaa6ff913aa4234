"""Executors: how the engine core reaches the model runner(s). Caller: engine.core.EngineCore.

Every executor offers what EngineCore needs of a runner (the Executor protocol):
    num_blocks_for_memory() -> int          KV blocks that fit (the smallest over the ranks)
    initialize_kv_cache(num_blocks) -> None
    execute(SchedulerOutput) -> ModelRunnerOutput
    shutdown() -> None                      stops worker processes / actors (idempotent)

    uni  UniprocExecutor     one ModelRunner in this process (world size 1; the default)
    mp   MultiprocExecutor   a spawned process per rank on this host (default for TP/PP)
    ray  RayExecutor         a Ray actor per rank, on one host or several

A dead or failing worker raises engine.executor.distributed.WorkerError from the call in
progress and from every later one.
"""

from __future__ import annotations

from typing import Protocol

from engine.config import EngineConfig
from engine.executor.distributed import WorkerError
from engine.runner_output import ModelRunnerOutput
from engine.scheduler_output import SchedulerOutput

__all__ = ["Executor", "WorkerError", "create_executor"]


class Executor(Protocol):
    def num_blocks_for_memory(self) -> int: ...

    def initialize_kv_cache(self, num_blocks: int) -> None: ...

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def shutdown(self) -> None: ...


def create_executor(config: EngineConfig) -> Executor:
    backend = config.parallel_config.distributed_executor_backend or "uni"
    if backend == "uni":
        if config.parallel_config.world_size != 1:
            raise ValueError(f"--distributed-executor-backend: uni runs one rank, but the world has "
                             f"{config.parallel_config.world_size} (use mp or ray)")
        from engine.executor.uniproc import UniprocExecutor

        return UniprocExecutor(config)
    if backend == "mp":
        from engine.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config)
    if backend == "ray":
        from engine.executor.ray_workers import RayExecutor

        return RayExecutor(config)
    raise ValueError(f"--distributed-executor-backend: must be uni, mp or ray, got {backend!r}")
