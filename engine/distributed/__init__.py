"""Tensor and pipeline parallelism: the ParallelContext record models and layers receive, process
group set-up for one rank, the pipeline's stage-to-stage transfers and the data-parallel vision
tower. Callers: engine.executor.worker (set-up), engine.layers / engine.models (collectives),
engine.runner.model_runner (pipeline stages)."""

from engine.distributed.parallel_context import SINGLE_RANK, ParallelContext, kv_heads_of_rank, layer_range

__all__ = ["SINGLE_RANK", "ParallelContext", "kv_heads_of_rank", "layer_range"]
