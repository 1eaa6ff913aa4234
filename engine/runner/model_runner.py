"""ModelRunner: owns the model, the KV cache tensors and the per-request device state; turns one
SchedulerOutput into one ModelRunnerOutput. It never decides who runs.

Caller: engine.core.EngineCore (num_blocks_for_memory -> initialize_kv_cache once, then execute
every step).

# Be paranoid about adding lines here: anything that is not "prepare, run, sample" belongs in
# input_batch.py, memory_plan.py, the sampler, or an encoder runner.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from engine.config import EngineConfig, text_config
from engine.distributed import pipeline
from engine.distributed.parallel_context import SINGLE_RANK, ParallelContext, kv_heads_of_rank, layer_range
from engine.layers.linear import set_batch_invariant
from engine.models import MRoPEModel, MultiModalModel, get_model_class
from engine.protocol import TokenLogprobs
from engine.runner import memory_plan
from engine.runner.cuda_graphs import DecodeGraphs
from engine.runner.encoder_runner import EncoderRunner
from engine.runner.input_batch import InputBatch, StepBatch
from engine.runner.mixed_graphs import MixedGraphs
from engine.runner_output import ModelRunnerOutput
from engine.runner.step_output import StepOutput
from engine.runner.transfer import to_device
from engine.sampler import Sampler, SamplerOutput, compute_logprobs
from engine.sampling_params import SamplingParams
from engine.scheduler_output import CachedRequestData, GrammarBitmask, NewRequestData, SchedulerOutput
from engine.weights import init_dummy_weights, iterate_weights, load_checked

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(config: EngineConfig, parallel: ParallelContext = SINGLE_RANK) -> torch.nn.Module:
    """Build the architecture's model directly on the device in the model dtype, then fill it
    from the checkpoint (checked: nothing missing, nothing unexpected) or with dummy weights.
    Under TP/PP the model holds this rank's share only; checkpoint tensors are read one at a time
    and cut to that share as they are loaded."""
    model_config = config.model_config
    device = torch.device(config.device_config.device)
    model_class = get_model_class(model_config.architecture)
    with torch.device(device), _default_dtype(model_config.dtype):
        model = (model_class(model_config.hf_config) if parallel.world_size == 1
                 else model_class(model_config.hf_config, parallel=parallel))
    model.to(device)  # buffers computed on the CPU (rotary tables)
    if model_config.load_format == "dummy":
        init_dummy_weights(model, seed=model_config.seed)
    else:
        load_checked(model, iterate_weights(model_config.path))
    if parallel.world_size > 1:
        num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        logger.info("rank %d (tp %d/%d, pp %d/%d): this rank's weights %.1f MiB", parallel.rank, parallel.tp_rank,
                    parallel.tp_size, parallel.pp_rank, parallel.pp_size, num_bytes / (1 << 20))
    return model.eval()


@dataclass
class _LaunchedForward:
    """A step between execute_model and sample_tokens."""

    batch: StepBatch
    hidden: torch.Tensor            # [T, H]
    logits: torch.Tensor | None     # [S, vocab], None when no row samples
    failed: dict[str, str]          # req_id -> error (media that failed)


class ModelRunner:
    def __init__(self, config: EngineConfig, parallel: ParallelContext = SINGLE_RANK):
        self.config = config
        self.parallel = parallel   # this rank's share (engine.executor.worker builds it)
        self.device = torch.device(config.device_config.device)
        self.text_config = text_config(config.model_config.hf_config)
        self.model = load_model(config, parallel)
        if self.device.type == "cuda" and config.device_config.deterministic:
            set_batch_invariant(self.model, True)   # see kernels/matmul.py
        self.sampler = Sampler()
        self.kv_cache = torch.empty(0)   # [layers, 2, num_blocks, block_size, kv_heads, head_dim]
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []   # per layer: views of kv_cache
        self.decode_graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.input_batch = self._new_input_batch()
        self._launched: _LaunchedForward | StepOutput | None = None   # execute_model -> sample_tokens
        # VL models: computes vision embeddings for scheduler_output.scheduled_encoder_inputs and
        # scatters them into inputs_embeds at the placeholder rows (engine/runner/encoder_runner.py).
        has_tower = isinstance(self.model, MultiModalModel) and parallel.is_first_stage
        self.encoder_runner = EncoderRunner.create(config) if has_tower else None

    def _new_input_batch(self) -> InputBatch:
        model_config = self.config.model_config
        return InputBatch(block_size=self.config.cache_config.block_size, device=self.device,
                          vocab_size=self.text_config.vocab_size, eos_token_ids=model_config.eos_token_ids,
                          default_seed=model_config.seed, uses_mrope=isinstance(self.model, MRoPEModel))

    # --- KV cache ----------------------------------------------------------------------------

    def kv_cache_shape(self) -> memory_plan.KVCacheShape:
        text = self.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        start, end = layer_range(text.num_hidden_layers, self.parallel.pp_rank, self.parallel.pp_size)
        _, num_kv_heads = kv_heads_of_rank(text.num_key_value_heads, self.parallel)   # this rank's layers / heads
        return memory_plan.KVCacheShape(num_layers=end - start, num_kv_heads=num_kv_heads,
                                        head_dim=head_dim, block_size=self.config.cache_config.block_size,
                                        dtype=self.config.model_config.dtype)

    def num_blocks_for_memory(self) -> int:
        cache_config, shape = self.config.cache_config, self.kv_cache_shape()
        if cache_config.num_gpu_blocks_override is not None:
            return cache_config.num_gpu_blocks_override
        if self.device.type == "cuda":
            encoder = memory_plan.encoder_plan(self.config) if self.encoder_runner is not None else None
            plan = memory_plan.plan_gpu(self.config, shape, lambda: self._profile_run(encoder), encoder)
        else:
            plan = memory_plan.plan_cpu(self.config, shape)
        parallel = self.parallel
        rank = ("" if parallel.world_size == 1
                else f"rank {parallel.rank} (tp {parallel.tp_rank}, pp {parallel.pp_rank}): ")
        logger.info("%s%s", rank, plan.describe(cache_config.block_size, self.config.model_config.max_model_len))
        return plan.num_blocks

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the cache, then capture the CUDA graphs over it (CUDA, not enforce_eager)."""
        self._allocate_kv_cache(num_blocks)
        self.decode_graphs, self.mixed_graphs = None, None
        # Not under TP/PP yet: the graphs would have to capture the collectives and stage transfers.
        if self.device.type == "cuda" and not self.config.device_config.enforce_eager and self.parallel.world_size == 1:
            sched, max_model_len = self.config.scheduler_config, self.config.model_config.max_model_len
            block_size, uses_mrope = self.config.cache_config.block_size, self.input_batch.uses_mrope
            self.decode_graphs = DecodeGraphs(self.model, self.kv_caches, sched.max_num_seqs, max_model_len,
                                              block_size, uses_mrope, self.device)
            self.decode_graphs.capture()
            max_tokens = min(self.config.device_config.mixed_graph_max_tokens, sched.max_num_batched_tokens)
            self.mixed_graphs = MixedGraphs(self.model, self.kv_caches, sched.max_num_seqs, max_model_len, block_size,
                                            uses_mrope, self._embed_width(), max_tokens,
                                            self.config.model_config.dtype, self.device)
            self.mixed_graphs.capture(self.decode_graphs.pool)

    def _embed_width(self) -> int | None:
        """Width of inputs_embeds for models with a tower (the runner merges vision rows into them)."""
        if self.encoder_runner is None:
            return None
        assert isinstance(self.model, MultiModalModel)
        return self.model.embed_input_ids(torch.zeros(1, dtype=torch.int64, device=self.device)).shape[-1]

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        """One [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] tensor; each layer's
        k/v are views of it, so a beam-search block copy is one indexed copy over all layers."""
        shape = self.kv_cache_shape()
        dims = (shape.num_layers, 2, num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
        self.kv_cache = (memory_plan.zeroed_host_tensor(dims, shape.dtype) if self.device.type == "cpu"
                         else torch.zeros(dims, dtype=shape.dtype, device=self.device))
        self.kv_caches = [(kv[0], kv[1]) for kv in self.kv_cache]

    def _copy_kv_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Beam search copy on write: block dst <- block src, in every layer's K and V at once
        (one gather and one scatter on the device, whatever the number of layers and copies)."""
        if not copies:
            return
        src_dst = to_device(torch.tensor(list(zip(*copies)), dtype=torch.int64), self.device)   # [2, C]
        self.kv_cache.index_copy_(2, src_dst[1], self.kv_cache.index_select(2, src_dst[0]))

    # --- one step ----------------------------------------------------------------------------

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_async(scheduler_output).result()

    def execute_async(self, scheduler_output: SchedulerOutput) -> StepOutput:
        """The whole step, masked with the SchedulerOutput's grammar bitmask (TP/PP workers)."""
        self.execute_model(scheduler_output)
        return self.sample_tokens(scheduler_output.grammar_bitmask)

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> None:
        """Launch the step's forward and logits; sample_tokens finishes it. In between the engine
        core builds the grammar bitmask on the host while the device computes."""
        for new_req in self.input_batch.update(scheduler_output):
            self._init_mrope_positions(new_req)
        self._copy_kv_blocks(scheduler_output.kv_block_copies)   # beam search: copy on write
        if self.encoder_runner is not None:  # evicted by the scheduler: drop before anything else
            self.encoder_runner.free(scheduler_output.free_encoder_mm_hashes)
        if scheduler_output.is_empty:
            self._launched = StepOutput.ready(ModelRunnerOutput(req_ids=[], sampled_token_ids=[]))
            return
        batch = self.input_batch.prepare(scheduler_output)
        hidden, failed = self._forward(scheduler_output, batch)               # [T, H]
        if hidden is None:  # an earlier pipeline stage: the last samples, record_sampled tells us
            self._launched = StepOutput.ready(ModelRunnerOutput(
                req_ids=batch.req_ids, sampled_token_ids=[[] for _ in batch.req_ids], failed=failed))
            return
        sampled_rows = hidden if batch.logits_indices is None else hidden[batch.logits_indices]   # [S, H]
        logits = self.model.compute_logits(sampled_rows) if batch.sampling_req_ids else None
        self._launched = _LaunchedForward(batch, hidden, logits, failed)   # logits [S, vocab]

    @torch.inference_mode()
    def sample_tokens(self, grammar_bitmask: GrammarBitmask | None) -> StepOutput:
        """Mask (structured outputs) and sample the launched step; its sampled tokens stay on the
        device (copied to pinned host memory behind an event). The caller may launch the next
        step before StepOutput.result()."""
        launched, self._launched = self._launched, None
        if not isinstance(launched, _LaunchedForward):
            assert launched is not None, "sample_tokens without execute_model"
            return launched
        batch = launched.batch
        sampler_output = self._sample(launched.logits, batch, grammar_bitmask)
        if sampler_output is not None:
            self.input_batch.mark_launched(batch.sampling_req_ids, sampler_output.sampled_token_ids)
        prompt_logprobs = self._prompt_logprobs(launched.hidden, batch)   # syncs; only requests that ask
        return StepOutput(self.input_batch, batch, sampler_output, prompt_logprobs, launched.failed)

    def _forward(self, scheduler_output: SchedulerOutput, batch: StepBatch):
        """-> (hidden [T, H], {req_id: error}). Steps that only decode output tokens (no prompt or
        vision rows) replay a captured decode graph; steps with prompt rows up to the mixed graphs'
        largest token count replay one of those (after the tower and the embedding merge, eager)."""
        graphs = self.decode_graphs
        if (graphs is not None and not scheduler_output.scheduled_encoder_inputs
                and batch.is_past_prompts and graphs.can_replay(batch.attn_metadata)):
            return graphs.replay(batch.input_ids, batch.positions, batch.attn_metadata), {}
        inputs_embeds, failed = self._inputs_embeds(scheduler_output, batch)
        if self.parallel.pp_size > 1:
            return self._forward_stage(batch, inputs_embeds), failed
        mixed = self.mixed_graphs   # steps with prompt rows (pure decode that cannot replay stays eager)
        if mixed is not None and batch.attn_metadata.max_query_len > 1 and mixed.can_replay(batch.attn_metadata):
            return mixed.replay(batch.input_ids, inputs_embeds, batch.positions, batch.attn_metadata), failed
        return self.model(batch.input_ids, batch.positions, batch.attn_metadata, self.kv_caches,
                          inputs_embeds=inputs_embeds), failed

    def _forward_stage(self, batch: StepBatch, inputs_embeds: torch.Tensor | None) -> torch.Tensor | None:
        """One pipeline stage: the previous stage's (hidden, residual) in, this stage's layers, the
        pair out to the next stage. -> hidden [T, H] on the last stage, None before it."""
        received = None
        if not self.parallel.is_first_stage:
            received = pipeline.recv_from_prev_stage(self.parallel, batch.input_ids.shape[0],
                                                     self.text_config.hidden_size, self.config.model_config.dtype,
                                                     self.device)
        out = self.model(batch.input_ids, batch.positions, batch.attn_metadata, self.kv_caches,
                         inputs_embeds=inputs_embeds, intermediate_tensors=received)
        if self.parallel.is_last_stage:
            return out
        pipeline.send_to_next_stage(self.parallel, out)
        return None

    def record_sampled(self, req_ids: list[str], sampled_token_ids: list[list[int]]) -> None:
        """Earlier pipeline stages: the tokens the last stage sampled in the previous step."""
        self.input_batch.append_sampled(req_ids, sampled_token_ids)

    def _inputs_embeds(self, scheduler_output: SchedulerOutput, batch: StepBatch):
        """-> (inputs_embeds [T, H] or None, {req_id: error} for requests whose media failed)."""
        if self.encoder_runner is None:
            return None, {}  # text model: the model embeds input_ids itself
        return self.encoder_runner.inputs_embeds(self.model, scheduler_output, self.input_batch, batch)

    def _init_mrope_positions(self, new_req: NewRequestData) -> None:
        if not self.input_batch.uses_mrope:
            return
        state = self.input_batch.requests[new_req.req_id]
        state.mrope_positions, state.mrope_delta = self.model.get_mrope_positions(
            state.prompt_token_ids, state.mm_items)

    def _sample(self, logits: torch.Tensor | None, batch: StepBatch,
                grammar_bitmask: GrammarBitmask | None = None) -> SamplerOutput | None:
        """logits [S, vocab] of the step's sampling rows -> SamplerOutput on the device, or None
        when none samples."""
        if logits is None:
            return None
        if grammar_bitmask is not None:   # [structured outputs] the sampler masks these rows
            assert batch.sampling is not None
            row_of = {req_id: row for row, req_id in enumerate(batch.sampling_req_ids)}
            rows = [row_of[req_id] for req_id in grammar_bitmask.req_ids]
            batch.sampling.grammar_rows = to_device(torch.tensor(rows), logits.device)
            batch.sampling.grammar_bitmask = to_device(grammar_bitmask.bitmask, logits.device)
        return self.sampler(logits, batch.sampling)

    def _prompt_logprobs(self, hidden: torch.Tensor, batch: StepBatch) -> dict[str, list[TokenLogprobs | None]]:
        result = {}
        for req_id, (first_row, targets, starts_prompt) in batch.prompt_logprob_rows.items():
            k = self.input_batch.requests[req_id].sampling_params.prompt_logprobs
            entries: list[TokenLogprobs | None] = [None] if starts_prompt else []
            if targets:
                logits = self.model.compute_logits(hidden[first_row:first_row + len(targets)])
                target_ids = torch.tensor(targets, device=logits.device)
                ids, values, ranks = (t.tolist() for t in compute_logprobs(logits, target_ids, max(k, 1)))
                entries += [TokenLogprobs(i[:k + 1], v[:k + 1], r[:k + 1]) for i, v, r in zip(ids, values, ranks)]
            result[req_id] = entries
        return result

    # --- memory profiling --------------------------------------------------------------------

    def _profile_tower(self, encoder: memory_plan.EncoderPlan) -> int:
        """The tower on the largest media batch a step may hold; returns its peak (bytes)."""
        from PIL import Image

        from vision.inputs import PlaceholderRange
        from vision.processors import get_processor

        model_config = self.config.model_config
        processor = get_processor(model_config.path, model_config.hf_config,
                                  self.config.multimodal_config.mm_processor_kwargs or None)
        height, width = memory_plan.largest_image_size(processor, encoder)
        processed = processor.process_image(Image.new("RGB", (width, height), (128, 128, 128)))
        item = processed.to_item(PlaceholderRange(offset=0, length=processed.num_tokens))
        peak = self.encoder_runner.profile(self.model, item, encoder.num_items_per_step)
        logger.info("vision tower profile: %d image(s) of %dx%d (%d rows each) in one call, peak %.2f GiB",
                    encoder.num_items_per_step, width, height, processed.num_tokens, peak / (1 << 30))
        return peak

    def _profile_run(self, encoder: memory_plan.EncoderPlan | None = None) -> int:
        """The largest step the scheduler can send: max_num_batched_tokens prompt tokens over
        up to max_num_seqs requests, all sampling with top-k/top-p, on a throwaway KV cache;
        first, for VL models, the tower on its largest media batch. Returns the tower's peak."""
        tower_peak = self._profile_tower(encoder) if encoder is not None and self.encoder_runner else 0
        sched = self.config.scheduler_config
        num_tokens = min(sched.max_num_batched_tokens, sched.max_num_seqs * self.config.model_config.max_model_len)
        num_reqs = min(sched.max_num_seqs, num_tokens)
        lengths = [num_tokens // num_reqs + (1 if i < num_tokens % num_reqs else 0) for i in range(num_reqs)]
        block_size = self.config.cache_config.block_size
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, logprobs=5)
        new_reqs, next_block = [], 0
        for i, length in enumerate(lengths):
            num_blocks = -(-length // block_size)
            new_reqs.append(NewRequestData(f"profile-{i}", [0] * length, [], [], params,
                                           list(range(next_block, next_block + num_blocks)), 0))
            next_block += num_blocks
        self._allocate_kv_cache(next_block)
        num_scheduled = {r.req_id: len(r.prompt_token_ids) for r in new_reqs}
        self.execute(SchedulerOutput(new_reqs, CachedRequestData(), num_scheduled, num_tokens, {}, set(), []))
        self.kv_cache, self.kv_caches = torch.empty(0), []
        self.input_batch = self._new_input_batch()
        return tower_peak

