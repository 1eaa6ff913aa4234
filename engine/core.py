"""EngineCore: the synchronous heart of the engine. Callers: engine.client (in-process, or the
busy loop of the core process) and tests. No I/O here: the client owns queues and pipes.

    step() = scheduler.schedule() -> executor.execute() -> scheduler.update_from_output()

In this process the executor's step is two calls, execute_model (launch the forward) and
sample_tokens (mask and sample): between them the core builds the step's grammar bitmask on the
host while the device computes (structured outputs; vLLM V1's execute_model -> grammar_bitmask ->
sample_tokens).

The executor (engine.executor) runs the model: one ModelRunner in this process, or a TP/PP world
of worker processes / Ray actors. A dead worker raises out of step(); the caller (engine.client)
reports the engine dead.

Invalid requests never raise into the loop: they come back as FinishReason.ERROR outputs with a
message in the next step's EngineOutputs.
"""

# Be paranoid about adding new lines to this file. It should stay a short sequence of calls into
# the scheduler and the runner; logic belongs in those, or in a new module.

from __future__ import annotations

import logging
import time
from typing import Protocol, runtime_checkable

from engine.config import EngineConfig
from engine.encoder_cache import EncoderCacheManager
from engine.executor import Executor
from engine.frontend import load_tokenizer
from engine.kv_cache.manager import KVCacheManager
from engine.protocol import EngineOutputs, EngineRequest, SchedulerStats
from engine.request import Request
from engine.runner_output import ModelRunnerOutput
from engine.runner.memory_plan import encoder_plan
from engine.scheduler import Scheduler
from engine.scheduler_output import GrammarBitmask, SchedulerOutput
from engine.structured_output.manager import StructuredOutputManager
from vision.inputs import MODALITIES

logger = logging.getLogger(__name__)


class PendingRunnerOutput(Protocol):
    """A launched step (engine.runner.step_output.StepOutput): result() waits for it alone."""

    def result(self) -> ModelRunnerOutput: ...


@runtime_checkable
class SplitStepExecutor(Protocol):
    """An executor whose step is two calls (one rank in this process): execute_model launches the
    forward, sample_tokens masks and samples and hands the output back later."""

    def execute_model(self, scheduler_output: SchedulerOutput) -> None: ...

    def sample_tokens(self, grammar_bitmask: GrammarBitmask | None) -> PendingRunnerOutput: ...


class EngineCore:
    def __init__(self, config: EngineConfig, runner: Executor | None = None) -> None:
        self.config = config
        self._init_runner(runner)
        self._init_kv_cache()
        self._init_scheduler()
        # (SchedulerOutput, StepOutput) of the step on the device (async scheduling only); StepOutput
        # None: its forward is launched, its sampling waits for its grammar bitmask (_step_ahead).
        self._inflight: tuple[SchedulerOutput, PendingRunnerOutput | None] | None = None
        # TP/PP executors and test fakes take the whole step (grammar bitmask in the SchedulerOutput).
        self._split_executor = self.executor if isinstance(self.executor, SplitStepExecutor) else None
        self.async_scheduling = config.scheduler_config.async_scheduling and self._split_executor is not None

    def _init_runner(self, runner: Executor | None) -> None:
        # An injected runner (tests) stands in for the executor: it offers the same methods.
        if runner is None:
            from engine.executor import create_executor

            runner = create_executor(self.config)
        self.executor: Executor = runner

    @property
    def runner(self):
        """The ModelRunner when it runs in this process (uni executor), else the executor."""
        from engine.executor.uniproc import UniprocExecutor

        return self.executor.runner if isinstance(self.executor, UniprocExecutor) else self.executor

    def _init_kv_cache(self) -> None:
        cache_config, max_model_len = self.config.cache_config, self.config.model_config.max_model_len
        override = cache_config.num_gpu_blocks_override
        self.num_blocks = override or self.executor.num_blocks_for_memory()
        num_tokens = (self.num_blocks - 1) * cache_config.block_size  # block 0 is the null block
        if num_tokens < max_model_len:
            message = (f"the KV cache holds {num_tokens} tokens ({self.num_blocks} blocks), fewer "
                       f"than one request at --max-model-len {max_model_len}")
            if override is None:
                raise ValueError(f"--max-model-len: {message}; lower it or give the KV cache more "
                                 f"memory (--gpu-memory-utilization / --kv-cache-memory-bytes)")
            logger.warning("%s; longer requests will fail", message)
        self.executor.initialize_kv_cache(self.num_blocks)
        logger.info("KV cache: %d blocks x %d = %d tokens; max concurrency at max_model_len %d: "
                    "%.2f requests", self.num_blocks - 1, cache_config.block_size, num_tokens,
                    max_model_len, num_tokens / max_model_len)

    def _init_scheduler(self) -> None:
        config = self.config
        kv_cache_manager = KVCacheManager(self.num_blocks, config.cache_config.block_size,
                                          config.cache_config.enable_prefix_caching)
        encoder_budget = self._encoder_budget()
        self.scheduler = Scheduler(
            config.scheduler_config, kv_cache_manager, EncoderCacheManager(encoder_budget),
            eos_token_ids=config.model_config.eos_token_ids,
            max_model_len=config.model_config.max_model_len, encoder_compute_budget=encoder_budget,
            structured_output_manager=StructuredOutputManager(
                config.structured_outputs_config, lambda: load_tokenizer(config.model_config),
                _vocab_size(config.model_config.hf_config),
                # [structured outputs] the runner in this process copies the bitmask to a GPU
                pin_bitmasks=config.device_config.device == "cuda" and isinstance(self.executor, SplitStepExecutor)))

    def _encoder_budget(self) -> int:
        """Embedding rows the encoder may compute per step and the encoder cache holds: for VL
        models the memory plan's (enough for the largest item the limits admit); without a media
        processor (text models, test fakes) enough for any item that fits the context."""
        plan = encoder_plan(self.config)
        if plan is not None:
            logger.info("encoder cache: %d rows (%.2f GiB); largest %s item %d rows; up to %d in one tower call",
                        plan.cache_size, plan.cache_bytes / (1 << 30), plan.modality, plan.max_tokens_per_item,
                        plan.num_items_per_step)
            return plan.cache_size
        explicit = self.config.multimodal_config.encoder_cache_size
        if explicit is not None:
            return explicit
        return max(self.config.scheduler_config.max_num_batched_tokens, self.config.model_config.max_model_len)

    def add_request(self, engine_request: EngineRequest) -> None:
        error = validate_engine_request(engine_request, _vocab_size(self.config.model_config.hf_config))
        if error is None and engine_request.req_id in self.scheduler.requests:
            error = f"request id {engine_request.req_id!r} is already in use"
        if error is not None:
            self.scheduler.reject(engine_request.req_id, error)
            return
        self.scheduler.add_request(Request.from_engine_request(engine_request))

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.abort_requests(req_ids)

    def step(self) -> EngineOutputs:
        if self.async_scheduling:
            return self._step_ahead()
        scheduler_output = self.scheduler.schedule()
        runner_output = self._execute(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def _execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if self._split_executor is None:
            bitmask = self.scheduler.get_grammar_bitmask(scheduler_output)
            scheduler_output.grammar_bitmask = bitmask.compact() if bitmask is not None else None
            return self.executor.execute(scheduler_output)
        self._split_executor.execute_model(scheduler_output)
        return self._split_executor.sample_tokens(self.scheduler.get_grammar_bitmask(scheduler_output)).result()

    def _step_ahead(self) -> EngineOutputs:
        """Async scheduling: schedule step N+1 and launch its forward, then wait for step N's tokens
        (the device runs N+1 meanwhile) and turn them into outputs. A beam group, whose next step
        needs N's log-probs on the host (scheduler.can_schedule_ahead), makes it wait for N first.
        [structured outputs] N+1's bitmask needs N's tokens accepted by the matchers: N's update
        starts building it in a thread right after the accept, and N+1's sampling is launched by
        the next call, after it scheduled N+2 (so the build overlaps the rest of the update, the
        output processing and that schedule), before N+2's forward."""
        assert self._split_executor is not None
        outputs = None
        if self._inflight is not None and not self.scheduler.can_schedule_ahead():
            outputs = self._finish_inflight()
        scheduler_output = self.scheduler.schedule()
        self._launch_deferred_sampling()
        self._split_executor.execute_model(scheduler_output)
        if self._inflight is not None and self.scheduler.has_structured_output_requests(scheduler_output):
            outputs = self._finish_inflight(next_step=scheduler_output)
            self._inflight = (scheduler_output, None)   # sampled by the next call
        else:
            launched = (scheduler_output,
                        self._split_executor.sample_tokens(self.scheduler.get_grammar_bitmask(scheduler_output)))
            if self._inflight is not None:
                outputs = self._finish_inflight()
            self._inflight = launched
        if outputs is None:   # the first step after idle: nothing has come back yet
            outputs = EngineOutputs(stats=self.scheduler.make_stats(), timestamp=time.time())
        return outputs

    def _launch_deferred_sampling(self) -> None:
        """[structured outputs] Sample the step in flight if its sampling waited for its bitmask
        (joins the build); it goes to the device before anything launched after it."""
        if self._inflight is not None and self._inflight[1] is None:
            assert self._split_executor is not None
            scheduler_output = self._inflight[0]
            self._inflight = (scheduler_output, self._split_executor.sample_tokens(
                self.scheduler.get_grammar_bitmask(scheduler_output)))

    def _finish_inflight(self, next_step: SchedulerOutput | None = None) -> EngineOutputs:
        """Step N's tokens -> outputs; next_step (N+1, scheduled): its bitmask build starts in N's update."""
        self._launch_deferred_sampling()
        assert self._inflight is not None and self._inflight[1] is not None
        scheduler_output, step_output = self._inflight
        self._inflight = None
        return self.scheduler.update_from_output(scheduler_output, step_output.result(), next_step)

    def has_unfinished_requests(self) -> bool:
        # An empty step in flight (async) has nothing to report: it must not keep the loop stepping.
        return ((self._inflight is not None and not self._inflight[0].is_empty)
                or self.scheduler.has_unfinished_requests())

    def stats(self) -> SchedulerStats:
        return self.scheduler.make_stats()

    def shutdown(self) -> None:
        """Stop the executor's workers (no-op in process)."""
        self.scheduler.structured_output.shutdown()
        self.executor.shutdown()

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv_cache_manager.reset_prefix_cache()


def validate_engine_request(engine_request: EngineRequest, vocab_size: int | None) -> str | None:
    """A user-facing message for what is wrong with the request, or None."""
    prompt = engine_request.prompt_token_ids
    if not prompt:
        return "the prompt must contain at least one token"
    try:
        engine_request.sampling_params.validate()
    except ValueError as error:
        return str(error)
    if vocab_size is not None and not all(0 <= token_id < vocab_size for token_id in prompt):
        return f"prompt token ids must be in [0, {vocab_size})"
    previous_end = 0
    for item in engine_request.mm_items:
        offset, length = item.placeholder.offset, item.placeholder.length
        if item.modality not in MODALITIES:
            return f"unknown modality {item.modality!r}"
        if length < 1 or offset < previous_end or offset + length > len(prompt):
            return (f"{item.modality} placeholder (offset={offset}, length={length}) must be non-empty, "
                    f"inside the prompt of {len(prompt)} tokens and after the previous item")
        previous_end = offset + length
    return None


def _vocab_size(hf_config) -> int | None:
    """The language model's vocabulary size (VL configs nest it), or None when unknown."""
    def field(config, name):
        return config.get(name) if isinstance(config, dict) else getattr(config, name, None)

    for config in (field(hf_config, "text_config"), field(hf_config, "llm_config"), hf_config):
        vocab_size = field(config, "vocab_size") if config is not None else None
        if isinstance(vocab_size, int):
            return vocab_size
    return None
