"""UniprocExecutor: the single-rank default -- one ModelRunner in the engine core's own process,
called directly (no copies, no messages: today's speed). Caller: engine.executor.create_executor."""

from __future__ import annotations

from engine.config import EngineConfig
from engine.runner_output import ModelRunnerOutput
from engine.scheduler_output import GrammarBitmask, SchedulerOutput


class UniprocExecutor:
    def __init__(self, config: EngineConfig, runner=None):
        if runner is None:
            from engine.runner.model_runner import ModelRunner

            runner = ModelRunner(config)
        self.config = config
        self.runner = runner

    def num_blocks_for_memory(self) -> int:
        return self.runner.num_blocks_for_memory()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(scheduler_output)

    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        """Launch the step's forward; sample_tokens finishes it (engine.core.SplitStepExecutor)."""
        self.runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar_bitmask: GrammarBitmask | None):
        """-> the step's StepOutput (engine.runner.step_output): result() later."""
        return self.runner.sample_tokens(grammar_bitmask)

    def shutdown(self) -> None:
        pass
