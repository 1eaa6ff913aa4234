"""EncoderRunner on hand-built SchedulerOutputs, with a real InputBatch and a fake model/processor
whose embeddings are known by construction: an item's frames ARE its embedding rows (one uint8
frame [1, rows, 1, HIDDEN], the fake processor flattens it, the fake tower returns it), and a
token's embedding is its id in every column. The oracle is that hand-built full-prompt matrix.
"""

import pytest
import torch

from engine.runner.encoder_runner import EncoderRunner
from engine.runner.input_batch import InputBatch
from engine.sampling_params import SamplingParams
from engine.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from vision.inputs import IMAGE, MultiModalItem, PlaceholderRange

HIDDEN = 3
BLOCK_SIZE = 4
PAD = 7   # placeholder token id


class FakeProcessor:
    def pixel_values_from_frames(self, frames, item, dtype):  # [1, rows, 1, HIDDEN] -> [rows, HIDDEN]
        return frames.reshape(-1, HIDDEN).to(dtype)


class FakeModel:
    """embed_multimodal fails for any item whose rows contain 255 (a 'tower error')."""

    embed_token_id = None   # every placeholder row takes a vision row

    def __init__(self):
        self.calls = []   # number of items per tower call

    def embed_input_ids(self, input_ids):
        return input_ids.to(torch.float32)[:, None].repeat(1, HIDDEN)     # [T, HIDDEN]

    def embed_multimodal(self, pixel_values, grid_thw):
        self.calls.append(len(grid_thw))
        if (pixel_values == 255).any():
            raise RuntimeError("tower exploded")
        return list(pixel_values.split(grid_thw.prod(dim=-1).tolist()))


def make_item(mm_hash: str, offset: int, rows: torch.Tensor) -> MultiModalItem:
    frames = rows.to(torch.uint8).reshape(1, -1, 1, HIDDEN)
    return MultiModalItem(modality=IMAGE, mm_hash=mm_hash, placeholder=PlaceholderRange(offset, len(rows)),
                          frames=frames.numpy().tobytes(), frames_shape=tuple(frames.shape),
                          grid_thw=(1, len(rows), 1))


def item_rows(seed: int, num_rows: int) -> torch.Tensor:
    return torch.randint(10, 200, (num_rows, HIDDEN), generator=torch.Generator().manual_seed(seed))


def prompt_with(items: list[MultiModalItem], length: int) -> list[int]:
    prompt = [100 + i for i in range(length)]
    for item in items:
        prompt[item.placeholder.offset:item.placeholder.offset + item.placeholder.length] = \
            [PAD] * item.placeholder.length
    return prompt


def expected_embeds(prompt: list[int], items: list[MultiModalItem], rows: dict[str, torch.Tensor]):
    """The oracle: token ids everywhere, each item's rows over its placeholder."""
    embeds = torch.tensor(prompt, dtype=torch.float32)[:, None].repeat(1, HIDDEN)
    for item in items:
        embeds[item.placeholder.offset:item.placeholder.offset + item.placeholder.length] = rows[item.mm_hash].float()
    return embeds


class Harness:
    def __init__(self):
        self.model = FakeModel()
        self.runner = EncoderRunner(FakeProcessor(), torch.device("cpu"), torch.float32)
        self.input_batch = InputBatch(block_size=BLOCK_SIZE, device=torch.device("cpu"), vocab_size=1000)
        self.computed = {}

    def step(self, plan: dict[str, int], new: dict | None = None, encoder_inputs=None, freed=()):
        """plan: req_id -> tokens this step; new: req_id -> (prompt, items[, prefix-cache hit tokens])
        for first-time requests."""
        new_reqs, cached = [], CachedRequestData()
        for req_id, (prompt, items, *hit) in (new or {}).items():
            blocks = list(range(len(self.computed) * 8, len(self.computed) * 8 + 8))
            self.computed[req_id] = hit[0] if hit else 0
            new_reqs.append(NewRequestData(req_id, prompt, [], items, SamplingParams(), blocks, self.computed[req_id]))
        for req_id in plan:
            if req_id not in (new or {}):
                cached.req_ids.append(req_id)
                cached.new_block_ids.append([])
                cached.num_computed_tokens.append(self.computed[req_id])
        output = SchedulerOutput(new_reqs, cached, dict(plan), sum(plan.values()), encoder_inputs or {},
                                 set(), list(freed))
        self.input_batch.update(output)
        self.runner.free(output.free_encoder_mm_hashes)
        batch = self.input_batch.prepare(output)
        embeds, failed = self.runner.inputs_embeds(self.model, output, self.input_batch, batch)
        for req_id, num in plan.items():
            self.computed[req_id] += num
        return embeds, failed


def test_one_batched_tower_call_and_rows_in_place():
    h = Harness()
    rows = {"a": item_rows(1, 4), "b": item_rows(2, 6)}
    items_1 = [make_item("a", 2, rows["a"]), make_item("b", 8, rows["b"])]
    items_2 = [make_item("b", 1, rows["b"])]                          # the same image in another request
    prompt_1, prompt_2 = prompt_with(items_1, 16), prompt_with(items_2, 9)
    embeds, failed = h.step({"r1": 16, "r2": 9}, new={"r1": (prompt_1, items_1), "r2": (prompt_2, items_2)},
                            encoder_inputs={"r1": [0, 1]})           # r2 uses "b" from r1's encode
    assert failed == {} and h.model.calls == [2]
    torch.testing.assert_close(embeds[:16], expected_embeds(prompt_1, items_1, rows), rtol=0, atol=0)
    torch.testing.assert_close(embeds[16:], expected_embeds(prompt_2, items_2, rows), rtol=0, atol=0)


def test_chunks_cutting_through_a_placeholder_slice_the_cached_rows():
    h = Harness()
    rows = {"a": item_rows(3, 7)}
    items = [make_item("a", 3, rows["a"])]                            # positions 3..9
    prompt = prompt_with(items, 14)
    expected = expected_embeds(prompt, items, rows)
    pieces = []
    embeds, _ = h.step({"r": 5}, new={"r": (prompt, items)}, encoder_inputs={"r": [0]})
    pieces.append(embeds)
    for num in (3, 6):                                                # [5, 8) inside, [8, 14) across the end
        embeds, failed = h.step({"r": num})
        assert failed == {}
        pieces.append(embeds)
    torch.testing.assert_close(torch.cat(pieces), expected, rtol=0, atol=0)
    assert h.model.calls == [1]                                       # encoded once, never per chunk


def test_freed_hashes_are_dropped_before_encoding():
    h = Harness()
    rows = {"a": item_rows(4, 4)}
    items = [make_item("a", 0, rows["a"])]
    prompt = prompt_with(items, 6)
    h.step({"r1": 6}, new={"r1": (prompt, items)}, encoder_inputs={"r1": [0]})
    assert set(h.runner.embeddings) == {"a"}
    embeds, failed = h.step({"r2": 6}, new={"r2": (prompt, items)}, encoder_inputs={"r2": [0]}, freed=["a"])
    assert failed == {} and h.model.calls == [1, 1]                   # dropped, then encoded again
    torch.testing.assert_close(embeds, expected_embeds(prompt, items, rows), rtol=0, atol=0)
    h.runner.free(["a"])
    assert h.runner.embeddings == {}


def test_needed_item_that_is_not_held_is_encoded_as_a_fallback():
    h = Harness()
    rows = {"a": item_rows(5, 4)}
    items = [make_item("a", 1, rows["a"])]
    prompt = prompt_with(items, 8)
    embeds, failed = h.step({"r": 8}, new={"r": (prompt, items)}, encoder_inputs={})
    assert failed == {} and h.model.calls == [1]
    torch.testing.assert_close(embeds, expected_embeds(prompt, items, rows), rtol=0, atol=0)


def test_bad_frames_fail_only_the_requests_that_need_them():
    h = Harness()
    rows = {"ok": item_rows(6, 4), "bad": item_rows(7, 4)}
    good_items = [make_item("ok", 2, rows["ok"])]
    bad_item = make_item("bad", 0, rows["bad"])
    bad_items = [MultiModalItem(IMAGE, "bad", bad_item.placeholder, bad_item.frames[:-5], bad_item.frames_shape,
                                bad_item.grid_thw)]
    prompt_good, prompt_bad = prompt_with(good_items, 8), prompt_with(bad_items, 6)
    embeds, failed = h.step({"good": 8, "bad": 6, "also_bad": 6, "twin_past_it": 2},
                            new={"good": (prompt_good, good_items), "bad": (prompt_bad, bad_items),
                                 "also_bad": (prompt_bad, bad_items),
                                 "twin_past_it": (prompt_bad, bad_items, 4)},   # a prefix hit past the item
                            encoder_inputs={"good": [0], "bad": [0]})
    assert set(failed) == {"bad", "also_bad", "twin_past_it"}
    assert "bytes" in failed["bad"] and "image" in failed["bad"]
    torch.testing.assert_close(embeds[:8], expected_embeds(prompt_good, good_items, rows), rtol=0, atol=0)


def test_tower_error_is_isolated_by_retrying_item_by_item():
    h = Harness()
    rows = {"ok": item_rows(8, 4), "boom": torch.full((4, HIDDEN), 255)}
    items = {name: [make_item(name, 1, rows[name])] for name in rows}
    prompts = {name: prompt_with(items[name], 6) for name in rows}
    embeds, failed = h.step({"ok": 6, "boom": 6}, new={n: (prompts[n], items[n]) for n in rows},
                            encoder_inputs={"ok": [0], "boom": [0]})
    assert list(failed) == ["boom"] and "tower exploded" in failed["boom"]
    assert h.model.calls == [2, 1, 1]                                 # batched, then one by one
    torch.testing.assert_close(embeds[:6], expected_embeds(prompts["ok"], items["ok"], rows), rtol=0, atol=0)


@pytest.mark.parametrize("num_rows", [3, 5])
def test_embedding_of_the_wrong_size_fails_the_request(num_rows):
    h = Harness()
    item = make_item("a", 0, item_rows(9, 4))
    prompt = prompt_with([item], 6)
    h.runner.embeddings["a"] = torch.zeros(num_rows, HIDDEN)
    _, failed = h.step({"r": 6}, new={"r": (prompt, [item])})
    assert "wrong size" in failed["r"]


class RaisingModel(FakeModel):
    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def embed_multimodal(self, pixel_values, grid_thw):
        self.calls.append(len(grid_thw))
        raise self.error


@pytest.mark.parametrize("error", [
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    torch.AcceleratorError("CUDA error: unspecified launch failure"),
])
def test_fatal_cuda_errors_stop_the_engine(error):
    from engine.runner.encoder_runner import FatalDeviceError

    h = Harness()
    h.model = RaisingModel(error)
    item = make_item("a", 0, item_rows(1, 4))
    with pytest.raises(FatalDeviceError):
        h.step({"r": 6}, new={"r": (prompt_with([item], 6), [item])}, encoder_inputs={"r": [0]})
    assert h.model.calls == [1]  # no retry: the device cannot be trusted any more


def test_out_of_memory_in_the_tower_fails_its_requests_with_the_numbers():
    h = Harness()
    h.model = RaisingModel(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    items = {name: [make_item(name, 1, item_rows(i, 4))] for i, name in enumerate(("a", "b"))}
    _, failed = h.step({"a": 6, "b": 6}, new={n: (prompt_with(items[n], 6), items[n]) for n in items},
                       encoder_inputs={"a": [0], "b": [0]})
    assert sorted(failed) == ["a", "b"] and h.model.calls == [2, 1, 1]   # batched, then one by one
    assert "out of memory in the vision tower encoding 1 item(s): 4 patches, 4 embedding rows" in failed["a"]
