"""engine.shared_frames without processes: a FrameRingWriter and a FrameRingReader over the same
memfd in this process. Oracle: the frames bytes themselves and hand-computed ring positions."""

import gc
import os

import msgspec
import numpy as np
import pytest

from engine.protocol import EngineRequest
from engine.sampling_params import SamplingParams
from engine.shared_frames import MIN_SHARED_BYTES, FrameRingReader, FrameRingWriter
from vision.inputs import MultiModalItem, PlaceholderRange

IMAGE_BYTES = 4 * 128 * 128 * 3   # 196,608: one "image" item of 4 frames 128x128


def make_request(req_id: str, seed: int, num_items: int = 1, height: int = 128) -> EngineRequest:
    rng = np.random.default_rng(seed)
    items = [MultiModalItem(modality="video", mm_hash=f"h{seed}-{i}", placeholder=PlaceholderRange(2 + 3 * i, 2),
                            frames=rng.integers(0, 256, (4, height, 128, 3), dtype=np.uint8).tobytes(),
                            frames_shape=(4, height, 128, 3), grid_thw=(2, 4, 4), second_per_grid_t=0.5)
             for i in range(num_items)]
    return EngineRequest(req_id=req_id, prompt_token_ids=list(range(3 * num_items + 4)),
                         sampling_params=SamplingParams(max_tokens=3), mm_items=items, arrival_time=1.5,
                         cache_salt="tenant")


@pytest.fixture
def ring():
    writer = FrameRingWriter(size=3 * IMAGE_BYTES + 1000)
    handle = writer.for_child()
    reader = FrameRingReader(os.dup(handle.fd), handle.size)
    yield writer, reader
    writer.close()


def through_ring(writer, reader, request):
    """What the core gets for `request` (None: it went inline). The message is msgpack-encoded and
    decoded as on the pipe."""
    shared = writer.share(request)
    if shared is None:
        return None
    writer.note_message_sent()
    wire = msgspec.msgpack.encode(shared)
    return reader.receive(msgspec.msgpack.decode(wire, type=type(shared)))


def test_request_arrives_whole_and_frames_are_read_only_views(ring):
    writer, reader = ring
    request = make_request("a", seed=1, num_items=2)
    received = through_ring(writer, reader, request)
    assert received is not None and writer.num_shared == 1 and reader.num_messages_sent() == 1
    for ours, theirs in zip(received.mm_items, request.mm_items, strict=True):
        assert bytes(ours.frames) == theirs.frames and len(ours.frames) == len(theirs.frames)
        assert bytes(bytearray(ours.frames)) == theirs.frames   # the runner's read
        assert not ours.frames.flags.writeable
        assert msgspec.structs.replace(ours, frames=b"") == msgspec.structs.replace(theirs, frames=b"")
    assert msgspec.structs.replace(received, mm_items=[]) == msgspec.structs.replace(request, mm_items=[])


def test_small_frames_and_text_go_inline(ring):
    writer, reader = ring
    small = make_request("s", seed=2, num_items=1, height=8)
    assert len(small.mm_items[0].frames) < MIN_SHARED_BYTES
    assert writer.share(small) is None
    assert writer.share(msgspec.structs.replace(small, mm_items=[])) is None
    assert writer.num_shared == 0 and writer.num_bytes_held == 0


def test_region_is_released_when_the_last_view_dies_in_any_order(ring):
    writer, reader = ring
    first = through_ring(writer, reader, make_request("a", seed=1))
    second = through_ring(writer, reader, make_request("b", seed=2))
    view_of_second = np.asarray(second.mm_items[0].frames)[10:20]   # a consumer's view keeps it alive
    assert reader.consumed == 0
    del second
    gc.collect()
    assert reader.consumed == 0   # the second is held by the view, and the first is not released
    del first
    gc.collect()
    assert reader.consumed == IMAGE_BYTES   # only the first: the second is still read
    del view_of_second
    gc.collect()
    assert reader.consumed == 2 * IMAGE_BYTES
    writer.acknowledge(reader.consumed)
    assert writer.num_bytes_held == 0


def test_full_ring_sends_inline_and_wraps_to_the_next_lap(ring):
    writer, reader = ring
    held = [through_ring(writer, reader, make_request(f"r{i}", seed=i)) for i in range(3)]
    assert writer.num_bytes_held == 3 * IMAGE_BYTES
    assert through_ring(writer, reader, make_request("full", seed=9)) is None   # no room: inline
    assert writer.num_inline_ring_full == 1
    del held[0]
    gc.collect()
    writer.acknowledge(reader.consumed)
    # 1000 bytes are left at the end: the next request starts the next lap, where r0 was.
    request = make_request("wrapped", seed=10)
    shared = writer.share(request)
    assert shared is not None and shared.start == writer.size
    received = reader.receive(msgspec.msgpack.decode(msgspec.msgpack.encode(shared), type=type(shared)))
    assert bytes(received.mm_items[0].frames) == request.mm_items[0].frames
    assert [bytes(r.mm_items[0].frames) for r in held] == [make_request("", seed=i).mm_items[0].frames for i in (1, 2)]


def test_frames_larger_than_the_ring_go_inline(ring):
    writer, _ = ring
    assert writer.share(make_request("big", seed=3, num_items=4)) is None
    assert writer.num_inline_ring_full == 1 and writer.num_bytes_held == 0


def test_out_of_step_message_is_refused(ring):
    writer, reader = ring
    first = writer.share(make_request("a", seed=1))
    second = writer.share(make_request("b", seed=2))
    reader.receive(second)
    with pytest.raises(RuntimeError, match="out of step"):
        reader.receive(first)
