"""EncoderRunner: the vision half of a model step. Runs the tower for the step's media items and
builds the step's `inputs_embeds` with their rows in place of the placeholder tokens.

Caller: engine.runner.model_runner (VL models only: those with `embed_multimodal`), once per step,
after InputBatch.prepare and before the model forward.

Per step:
  1. drop the embeddings the scheduler evicted (free_encoder_mm_hashes) -- always first, even in
     an empty step (`free`, called by the model runner);
  2. encode, in ONE tower call, every item the scheduler scheduled (scheduled_encoder_inputs) plus
     any item this step needs that is not held (a fallback: e.g. a failed earlier encode);
  3. embed the step's input ids, then copy each item's rows over its placeholder rows.

A chunk may cut through a placeholder: the step covers prompt positions [start, end) of a request
and copies only the overlap, e.g. an item at offset 5 of length 8 and a chunk [8, 16):

    positions   5 6 7 | 8 9 10 11 12 | 13 ...        embedding rows 3..7 -> step rows of 8..12
               (earlier chunk)  this chunk

Failure isolation: an item whose frames cannot become pixel values, or whose tower call fails,
fails only the requests of this step that hold it (returned as req_id -> message, which the model
runner puts in ModelRunnerOutput.failed); the rest of the batch runs normally.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch

from engine.runner.transfer import to_device
from engine.scheduler_output import SchedulerOutput
from vision.inputs import MultiModalItem

logger = logging.getLogger(__name__)


class EncoderRunner:
    def __init__(self, processor, device: torch.device, dtype: torch.dtype):
        self.processor = processor   # provides pixel_values_from_frames (vision.processors)
        self.device = device
        self.dtype = dtype
        self.embeddings: dict[str, torch.Tensor] = {}   # mm_hash -> [num_tokens, hidden]
        self.num_tower_calls = 0      # counters for tests and metrics
        self.num_encoded_items = 0

    @classmethod
    def create(cls, config) -> "EncoderRunner":
        from vision.processors import get_processor

        model_config = config.model_config
        processor = get_processor(model_config.path, model_config.hf_config)
        return cls(processor, torch.device(config.device_config.device), model_config.dtype)

    def free(self, mm_hashes: list[str]) -> None:
        """Drop embeddings the scheduler evicted (SchedulerOutput.free_encoder_mm_hashes)."""
        for mm_hash in mm_hashes:
            self.embeddings.pop(mm_hash, None)

    def inputs_embeds(self, model, scheduler_output: SchedulerOutput, input_batch, batch
                      ) -> tuple[torch.Tensor, dict[str, str]]:
        """-> (inputs_embeds [T, hidden], {req_id: error} for requests whose media failed).
        The step's free_encoder_mm_hashes must have been dropped with `free` before."""
        failed_items = self._encode(model, self._items_to_encode(scheduler_output, input_batch, batch))
        embeds = model.embed_input_ids(batch.input_ids)   # [T, hidden]
        failed: dict[str, str] = {}
        first_row = 0
        for req_id, num_new in zip(batch.req_ids, batch.num_scheduled_tokens):
            state = input_batch.requests[req_id]
            error = _failed_item(state.mm_items, failed_items) or self._merge_request(
                embeds, first_row, state.num_computed_tokens, num_new, state.mm_items, failed_items,
                _EmbedMask(model.embed_token_id, state.prompt_token_ids))
            if error is not None:
                failed[req_id] = error
            first_row += num_new
        return embeds, failed

    def profile(self, model, item: MultiModalItem, num_items: int) -> int:
        """Encodes `num_items` copies of `item` in one tower call (the largest media batch a step
        may hold) and forgets them; returns the call's peak device memory over what was allocated
        before (bytes; 0 off CUDA). Caller: ModelRunner's memory profile."""
        is_cuda = self.device.type == "cuda"
        if is_cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        pixel_values = self._pixel_values(item)
        copies = {f"profile-{i}": (pixel_values, item) for i in range(num_items)}
        self._run_tower(model, copies)
        peak = torch.cuda.max_memory_allocated() - before if is_cuda else 0
        self.free(list(copies))
        self.num_tower_calls, self.num_encoded_items = 0, 0
        return peak

    # ---- which items ----------------------------------------------------------------------

    def _items_to_encode(self, scheduler_output: SchedulerOutput, input_batch, batch
                         ) -> dict[str, MultiModalItem]:
        """mm_hash -> item, in first-use order: the scheduled ones, then needed-but-missing ones."""
        items: dict[str, MultiModalItem] = {}
        for req_id, input_ids in scheduler_output.scheduled_encoder_inputs.items():
            mm_items = input_batch.requests[req_id].mm_items
            for input_id in input_ids:
                items.setdefault(mm_items[input_id].mm_hash, mm_items[input_id])
        for req_id, num_new in zip(batch.req_ids, batch.num_scheduled_tokens):
            state = input_batch.requests[req_id]
            for item in _overlapping(state.mm_items, state.num_computed_tokens, num_new):
                if item.mm_hash not in self.embeddings:
                    items.setdefault(item.mm_hash, item)
        return items

    # ---- encoding -------------------------------------------------------------------------

    def _encode(self, model, items: dict[str, MultiModalItem]) -> dict[str, str]:
        """Encode the items into self.embeddings; returns {mm_hash: error} for those that failed."""
        failed: dict[str, str] = {}
        ready: dict[str, tuple[torch.Tensor, MultiModalItem]] = {}
        for mm_hash, item in items.items():
            try:
                ready[mm_hash] = (self._pixel_values(item), item)
            except Exception as exc:  # bad frames fail their requests only
                failed[mm_hash] = _error(item, exc)
        if not ready:
            return failed
        try:
            self._run_tower_guarded(model, ready)
        except Exception as exc:
            if len(ready) == 1:
                mm_hash, (_, item) = next(iter(ready.items()))
                failed[mm_hash] = _error(item, exc)
                return failed
            for mm_hash, entry in ready.items():  # find the culprit (or fit in memory): one item per call
                try:
                    self._run_tower_guarded(model, {mm_hash: entry})
                except Exception as item_exc:
                    failed[mm_hash] = _error(entry[1], item_exc)
        return failed

    def _run_tower_guarded(self, model, ready: dict[str, tuple[torch.Tensor, MultiModalItem]]) -> None:
        """_run_tower, with its failures sorted: a CUDA error that poisons the device (device-side
        assert, illegal address) propagates and stops the engine (requests then get 503); an
        out-of-memory becomes TowerOutOfMemory with the numbers; anything else is the input's."""
        try:
            self._run_tower(model, ready)
        except torch.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise TowerOutOfMemory(_out_of_memory_message(ready, self.device)) from exc
        except Exception as exc:
            if is_fatal_device_error(exc):
                logger.error("the vision tower hit a fatal device error; stopping the engine: %s", exc)
                raise FatalDeviceError(str(exc)) from exc
            raise

    def _pixel_values(self, item: MultiModalItem) -> torch.Tensor:
        """The item's uint8 frames, moved to the device, -> pixel values [patches, patch_dim]."""
        num_bytes = math.prod(item.frames_shape)
        if len(item.frames) != num_bytes:
            raise ValueError(f"its frames hold {len(item.frames)} bytes but shape {list(item.frames_shape)} "
                             f"needs {num_bytes}")
        # Read where they lie, not copied into a bytearray first (a 448x448 image: 602 KB of fresh
        # pages on the engine's thread): nothing writes to them, and the pinned staging copy (CUDA)
        # or the float32 conversion (CPU) below is the first copy. PyTorch warns that they are read-only.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
            frames = torch.frombuffer(item.frames, dtype=torch.uint8).view(item.frames_shape)
        return self.processor.pixel_values_from_frames(to_device(frames, self.device), item, self.dtype)

    def _run_tower(self, model, ready: dict[str, tuple[torch.Tensor, MultiModalItem]]) -> None:
        pixel_values = torch.cat([values for values, _ in ready.values()])           # [N, patch_dim]
        grid_thw = torch.tensor([item.grid_thw for _, item in ready.values()], dtype=torch.int64)  # [n, 3]
        embeddings = model.embed_multimodal(pixel_values, grid_thw)
        self.num_tower_calls += 1
        self.num_encoded_items += len(ready)
        for mm_hash, embedding in zip(ready, embeddings, strict=True):
            self.embeddings[mm_hash] = embedding   # [num_tokens, hidden]

    # ---- merging --------------------------------------------------------------------------

    def _merge_request(self, embeds: torch.Tensor, first_row: int, start: int, num_new: int,
                       mm_items: list[MultiModalItem], failed_items: dict[str, str],
                       embed_mask: "_EmbedMask") -> str | None:
        """Copy the rows of the items overlapping positions [start, start + num_new) into embeds
        (step rows from first_row). Returns an error message when an item is unusable."""
        end = start + num_new
        for item in _overlapping(mm_items, start, num_new):
            if item.mm_hash in failed_items:
                return failed_items[item.mm_hash]
            embedding = self.embeddings.get(item.mm_hash)
            offset, length = item.placeholder.offset, item.placeholder.length
            is_embed = embed_mask.of(item)  # None: every placeholder row takes an embedding row
            num_rows = length if is_embed is None else int(is_embed.sum())
            if embedding is None or embedding.shape[0] != num_rows:
                return (f"{item.modality} embedding is unavailable or has the wrong size for its "
                        f"{num_rows} placeholder tokens")
            lo, hi = max(start, offset), min(end, offset + length)
            if is_embed is None:
                embeds[first_row + lo - start:first_row + hi - start] = embedding[lo - offset:hi - offset]
                continue
            picked = is_embed[lo - offset:hi - offset]           # [hi - lo] bool
            skipped = int(is_embed[:lo - offset].sum())          # embedding rows of earlier chunks
            step_rows = first_row + lo - start + picked.nonzero().squeeze(1)
            embeds[to_device(step_rows, embeds.device)] = embedding[skipped:skipped + len(step_rows)]
        return None


class TowerOutOfMemory(RuntimeError):
    """The tower ran out of device memory on this step's items (their requests fail; others run)."""


class FatalDeviceError(BaseException):
    """A CUDA error after which no kernel can be trusted. A BaseException so that no per-request
    `except Exception` swallows it: it must reach the engine core and stop it."""


_FATAL_CUDA_MESSAGES = ("device-side assert", "illegal memory access", "illegal address", "CUDA error",
                        "unspecified launch failure", "misaligned address")


def is_fatal_device_error(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    return isinstance(exc, torch.AcceleratorError) or (
        isinstance(exc, RuntimeError) and any(text in str(exc) for text in _FATAL_CUDA_MESSAGES))


def _out_of_memory_message(ready: dict[str, tuple[torch.Tensor, MultiModalItem]], device: torch.device) -> str:
    num_patches = sum(values.shape[0] for values, _ in ready.values())
    num_rows = sum(item.placeholder.length for _, item in ready.values())
    memory = ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        memory = (f"; device: {torch.cuda.memory_allocated(device) >> 20} MiB allocated, "
                  f"{torch.cuda.memory_reserved(device) >> 20} MiB reserved, "
                  f"{free >> 20} MiB free of {total >> 20} MiB")
    return (f"out of memory in the vision tower encoding {len(ready)} item(s): {num_patches} patches, "
            f"{num_rows} embedding rows{memory}. Use smaller media (--mm-processor-kwargs max_pixels, "
            f"--limit-mm-per-prompt) or a lower --gpu-memory-utilization")


class _EmbedMask:
    """Models whose placeholder spans also hold plain tokens (InternVL: `<img>`, `</img>`, "Frame2: "
    around its `<IMG_CONTEXT>` rows; Qwen3-VL: a video's timestamps and vision start/end between its
    frames) name the token(s) that take vision rows as `embed_token_id` (an id or a tuple of ids);
    the item's embedding then has one row per such token, in order."""

    def __init__(self, embed_token_id: int | None, prompt_token_ids: list[int]):
        self.embed_token_id, self.prompt_token_ids = embed_token_id, prompt_token_ids

    def of(self, item: MultiModalItem) -> torch.Tensor | None:  # [length] bool, or None
        if self.embed_token_id is None:
            return None
        offset, length = item.placeholder.offset, item.placeholder.length
        span = torch.tensor(self.prompt_token_ids[offset:offset + length])
        if isinstance(self.embed_token_id, tuple):
            return torch.isin(span, torch.tensor(self.embed_token_id))
        return span == self.embed_token_id


def _failed_item(mm_items: list[MultiModalItem], failed_items: dict[str, str]) -> str | None:
    """The error of any item of the request that failed this step, even one outside this step's
    tokens: a request that skipped it through a prefix-cache hit (e.g. a twin scheduled in the same
    step) shares KV that was computed without it."""
    return next((failed_items[item.mm_hash] for item in mm_items if item.mm_hash in failed_items), None)


def _overlapping(mm_items: list[MultiModalItem], start: int, num_new: int):
    """Items (sorted by offset) whose placeholder overlaps positions [start, start + num_new)."""
    end = start + num_new
    for item in mm_items:
        offset, length = item.placeholder.offset, item.placeholder.length
        if offset >= end:
            break
        if offset + length > start:
            yield item


def _error(item: MultiModalItem, exc: BaseException) -> str:
    logger.warning("encoding a %s item failed: %r", item.modality, exc)
    return f"failed to process the {item.modality} input: {exc}"
