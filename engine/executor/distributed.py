"""DistributedExecutor: drives a world of TP x PP workers as if it were one ModelRunner.

Caller: engine.core.EngineCore (through engine.executor.create_executor). The worker group -- a
process per rank (engine.executor.multiproc) or a Ray actor per rank (engine.executor.ray_workers)
-- only knows how to call one method on every rank and collect the answers; the step logic is
here:

    execute(so) -> every rank: worker.execute(so, tokens the last stage sampled last step)
                <- output rank (last stage, last tp rank): ModelRunnerOutput; others: failures
    KV cache     = the smallest number of blocks any rank can hold (every rank has the same
                   block table; each holds its own layers' and heads' share of every block)

A worker that dies or raises makes every later call fail at once with WorkerError (EngineCore
lets it propagate, the client reports the engine dead): the survivors may be blocked in a
collective with the dead rank, so the whole group is torn down rather than waited for.
"""

from __future__ import annotations

from typing import Any, Protocol

from engine.config import EngineConfig
from engine.runner_output import ModelRunnerOutput
from engine.scheduler_output import SchedulerOutput


class WorkerError(RuntimeError):
    """A worker process or actor died or failed; the executor cannot run any more steps."""


class WorkerGroup(Protocol):
    def call_all(self, method: str, *args: Any) -> list[Any]:
        """Run worker.method(*args) on every rank; results in rank order. Raises WorkerError."""

    def shutdown(self, graceful: bool = True) -> None:
        """Stop every rank; graceful=False kills at once (survivors may be stuck in a collective)."""


class DistributedExecutor:
    def __init__(self, config: EngineConfig, workers: WorkerGroup):
        self.config = config
        self.workers = workers
        self._previous_sampled: tuple[list[str], list[list[int]]] | None = None
        self._dead_error: str | None = None

    def num_blocks_for_memory(self) -> int:
        return min(self._call("num_blocks_for_memory"))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call("initialize_kv_cache", num_blocks)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        results = self._call("execute", scheduler_output, self._previous_sampled)
        output: ModelRunnerOutput = results[-1]
        for failed in results[:-1]:   # e.g. media that failed on the first stage
            for req_id, error in failed.items():
                output.failed.setdefault(req_id, error)
        self._previous_sampled = (output.req_ids, output.sampled_token_ids) if output.req_ids else None
        return output

    def _call(self, method: str, *args: Any) -> list[Any]:
        if self._dead_error is not None:
            raise WorkerError(self._dead_error)
        try:
            return self.workers.call_all(method, *args)
        except WorkerError as exc:
            self._dead_error = str(exc)
            self.workers.shutdown(graceful=False)
            raise

    def shutdown(self) -> None:
        self.workers.shutdown()
