"""EngineCore: the synchronous heart of the engine. Callers: engine.client (in-process, or the
busy loop of the core process) and tests. No I/O here: the client owns queues and pipes.

    step() = scheduler.schedule() -> executor.execute() -> scheduler.update_from_output()

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

from engine.config import EngineConfig
from engine.encoder_cache import EncoderCacheManager
from engine.frontend import load_tokenizer
from engine.kv_cache.manager import KVCacheManager
from engine.protocol import EngineOutputs, EngineRequest, SchedulerStats
from engine.request import Request
from engine.scheduler import Scheduler
from engine.structured_output.manager import StructuredOutputManager
from vision.inputs import MODALITIES

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, runner=None) -> None:
        self.config = config
        self._init_runner(runner)
        self._init_kv_cache()
        self._init_scheduler()

    def _init_runner(self, runner) -> None:
        # An injected runner (tests) stands in for the executor: it offers the same methods.
        if runner is None:
            from engine.executor import create_executor

            runner = create_executor(self.config)
        self.executor = runner

    @property
    def runner(self):
        """The ModelRunner when it runs in this process (uni executor), else the executor."""
        return getattr(self.executor, "runner", self.executor)

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
                _vocab_size(config.model_config.hf_config)))

    def _encoder_budget(self) -> int:
        """Embedding rows the encoder may compute per step and the encoder cache holds. Default:
        enough for the largest item the runner can produce (else any item that fits the context)."""
        explicit = self.config.multimodal_config.encoder_cache_size
        if explicit is not None:
            return explicit
        max_item = getattr(self.executor, "max_encoder_tokens_per_item", None)
        max_item_tokens = max_item() if callable(max_item) else self.config.model_config.max_model_len
        return max(self.config.scheduler_config.max_num_batched_tokens, max_item_tokens)

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
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> SchedulerStats:
        return self.scheduler.make_stats()

    def shutdown(self) -> None:
        """Stop the executor's workers (no-op in process)."""
        self.scheduler.structured_output.shutdown()
        shutdown = getattr(self.executor, "shutdown", None)
        if callable(shutdown):
            shutdown()

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
