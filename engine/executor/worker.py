"""Worker: one rank of a TP/PP world -- joins the process groups, holds its ModelRunner, and runs
what the executor asks. Callers: engine.executor.multiproc (in a spawned process per rank) and
engine.executor.ray_workers (inside a Ray actor).

Every rank executes every step. The last rank of the last pipeline stage returns the full
ModelRunnerOutput; the others return only the per-request failures they saw (bad media is found
on the first stage). Earlier pipeline stages do not sample, so each step's message carries the
tokens the last stage sampled the step before (`previous_sampled`).
"""

from __future__ import annotations

import logging
import os

import torch

from engine.config import EngineConfig
from engine.runner_output import ModelRunnerOutput
from engine.scheduler_output import SchedulerOutput

logger = logging.getLogger(__name__)

# Set in every worker before any GPU library loads: NVLink multicast (NVLS) and symmetric-memory
# multicast stay off (they misbehave on the shared hosts we run on; see the project's KINDS notes).
WORKER_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

PreviousSampled = tuple[list[str], list[list[int]]]   # (req_ids, sampled_token_ids) of the last step


def set_worker_env() -> None:
    os.environ.update(WORKER_ENV)


class Worker:
    def __init__(self, config: EngineConfig, rank: int, init_method: str, local_rank: int):
        from engine.distributed.process_groups import init_distributed
        from engine.runner.model_runner import ModelRunner

        set_worker_env()
        parallel_config = config.parallel_config
        device = config.device_config.device
        if device == "cuda":
            torch.cuda.set_device(local_rank)
        else:  # the ranks share the host's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // parallel_config.world_size))
        self.parallel = init_distributed(rank, parallel_config.tensor_parallel_size,
                                         parallel_config.pipeline_parallel_size, init_method, device)
        self.is_output_rank = rank == parallel_config.world_size - 1
        self.runner = ModelRunner(config, self.parallel)

    def num_blocks_for_memory(self) -> int:
        return self.runner.num_blocks_for_memory()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute(self, scheduler_output: SchedulerOutput,
                previous_sampled: PreviousSampled | None) -> ModelRunnerOutput | dict[str, str]:
        """-> the full output on the output rank, else {req_id: error} seen by this rank."""
        if previous_sampled is not None and not self.parallel.is_last_stage:
            self.runner.record_sampled(*previous_sampled)
        output = self.runner.execute(scheduler_output)
        return output if self.is_output_rank else output.failed

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        from engine.distributed.process_groups import destroy_distributed

        destroy_distributed()
