"""Media frames through the shared-memory ring (engine.shared_frames) with the core in a spawned
process (AsyncEngineClient), on the tiny Qwen2.5-VL checkpoint, float32 CPU.

Oracle: transformers' greedy tokens and top-5 logprobs (tests/reference.py) for images and a video
that go through the ring, next to a small image that goes inline; for the lifetime, the ring's own
count of bytes the core still holds, which must return to 0 after a normal finish, an abort, a
request the core refuses and one whose media fail; a full ring sends inline with the same tokens;
after a core crash and shutdown no mapping of the ring is left in this process and /dev/shm has
no new entry.
"""

import asyncio
import os
import signal
import time

import msgspec
import numpy as np
import pytest
from PIL import Image

from engine import shared_frames
from engine.client import AsyncEngineClient, EngineDeadError
from engine.config_loader import create_engine_config
from engine.frontend import MediaInput
from engine.sampling_params import SamplingParams
from reference import RefRequest, RefVideo, hf_generate

NUM_NEW_TOKENS, TOP_K, LOGPROB_ATOL = 8, 5, 1e-4
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=TOP_K)


def chat(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def pattern(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 // (width - 1), ys * 255 // (height - 1), (xs + ys) * 255 // (width + height - 2)], -1)
    return np.clip(base + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8)  # [H, W, 3]


def image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(pattern(width, height, seed))


VIDEO = np.stack([pattern(112, 112, 40 + i) for i in range(4)])   # [4, 112, 112, 3]: 150,528 bytes
CASES = {   # name -> (prompt, images, videos); frames of 64 KiB or more go through the ring
    "large_image": (chat(f"{IMG}Describe this image."), [image(448, 448, 1)], []),              # 602,112 bytes
    "two_images": (chat(f"{IMG}The cat sat on the mat.{IMG}Which is brighter?"),
                   [image(224, 168, 2), image(300, 200, 3)], []),
    "video": (chat(f"{VID}What happens?"), [], [VIDEO]),
    "small_image": (chat(f"{IMG}Inline."), [image(112, 84, 4)], []),                             # 28,224: inline
}
NUM_SHARED_CASES = 3


def shm_entries() -> set[str]:
    """/dev/shm's entries but POSIX semaphores (sem.*: multiprocessing locks of any process on this
    machine come and go there; the transport makes none)."""
    return {name for name in os.listdir("/dev/shm") if not name.startswith("sem.")}


def ring_mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum(shared_frames.MEMFD_NAME in line for line in maps)


def start_client(model_dir: str) -> AsyncEngineClient:
    config = create_engine_config(model=model_dir, dtype="float32", max_model_len=1024, num_gpu_blocks_override=256)
    return AsyncEngineClient.start(config)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("qwen2_5_vl"))


@pytest.fixture(scope="module")
def reference(model_dir):
    requests = [RefRequest(prompt=text, images=tuple(images), videos=tuple(RefVideo(v, None) for v in videos))
                for text, images, videos in CASES.values()]
    return dict(zip(CASES, hf_generate(model_dir, requests, NUM_NEW_TOKENS, top_k=TOP_K, ignore_eos=True)))


@pytest.fixture(scope="module")
def client(model_dir):
    shm_before, maps_before = shm_entries(), ring_mappings()
    client = start_client(model_dir)
    assert client._core.frame_ring is not None and ring_mappings() > maps_before   # the ring is in use here
    yield client
    asyncio.run(client.shutdown(0))
    assert ring_mappings() == maps_before and shm_entries() <= shm_before


def make_request(client, req_id: str, case: str, params: SamplingParams = GREEDY):
    text, images, videos = CASES[case]
    media = [MediaInput("image", i) for i in images] + [MediaInput("video", v) for v in videos]
    return client.frontend.make_request(req_id, text, media, params, add_special_tokens=False)


async def final_output(client, request):
    outputs = [output async for output in client.generate(request)]
    return outputs[-1]


def assert_matches(output, ref) -> None:
    completion = output.outputs[0]
    assert output.error is None and output.prompt_token_ids == ref.prompt_token_ids
    assert completion.token_ids == ref.token_ids
    for ours, theirs in zip(completion.logprobs, ref.top_logprobs, strict=True):
        assert max(abs(ours[token_id].logprob - logprob) for token_id, logprob in theirs.items()) <= LOGPROB_ATOL


async def wait_until_ring_released(client, timeout_s: float = 10.0) -> None:
    """A text request steps the core (the runner lets go of finished requests a step later) and
    brings back the core's acknowledgement; then the ring must hold nothing."""
    ring = client._core.frame_ring
    await final_output(client, client.frontend.make_request(f"flush-{time.monotonic()}", "flush", [],
                                                            SamplingParams(max_tokens=4, ignore_eos=True)))
    deadline = time.monotonic() + timeout_s
    while ring.num_bytes_held and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert ring.num_bytes_held == 0


def test_ring_requests_match_transformers(client, reference):
    ring = client._core.frame_ring
    num_shared = ring.num_shared

    async def main():
        requests = [make_request(client, f"parity-{name}", name) for name in CASES]
        outputs = await asyncio.gather(*(final_output(client, request) for request in requests))
        await wait_until_ring_released(client)
        return outputs

    for name, output in zip(CASES, asyncio.run(main())):
        assert_matches(output, reference[name])
    assert ring.num_shared - num_shared == NUM_SHARED_CASES and ring.num_inline_ring_full == 0


def test_ring_is_released_after_finish_abort_refusal_and_failed_media(client, reference):
    vocab_size = client.frontend.vocab_size
    refused = make_request(client, "refused", "large_image")
    refused = msgspec.structs.replace(refused, prompt_token_ids=[vocab_size + 7] + refused.prompt_token_ids[1:])
    # A fresh image: one the encoder cache holds already would never reach the tower's checks.
    bad_media = client.frontend.make_request("bad-media", CASES["large_image"][0], [MediaInput("image", image(448, 448, 9))],
                                             GREEDY, add_special_tokens=False)
    bad_media.mm_items[0] = msgspec.structs.replace(bad_media.mm_items[0], frames_shape=(1, 448, 447, 3))

    async def main():
        finished = await final_output(client, make_request(client, "finished", "large_image"))
        await wait_until_ring_released(client)
        aborted = []
        async for output in client.generate(make_request(client, "aborted", "large_image", SamplingParams(max_tokens=500))):
            aborted.append(output)
            if len(aborted) == 1:
                await client.abort("aborted")
        await wait_until_ring_released(client)
        refused_output = await final_output(client, refused)
        await wait_until_ring_released(client)
        bad_output = await final_output(client, bad_media)
        await wait_until_ring_released(client)
        return finished, aborted[-1], refused_output, bad_output

    finished, aborted, refused_output, bad_output = asyncio.run(main())
    assert_matches(finished, reference["large_image"])
    assert aborted.outputs[0].finish_reason == "abort"
    assert refused_output.outputs[0].finish_reason == "error" and "prompt token ids must be in" in refused_output.error
    assert bad_output.outputs[0].finish_reason == "error" and "frames" in bad_output.error
    assert client._core.frame_ring.num_shared >= 4


def test_full_ring_goes_inline_and_core_crash_leaves_nothing(model_dir, reference, monkeypatch):
    """A ring with room for one large image: concurrent ones go inline, with the same tokens."""
    shm_before, maps_before = shm_entries(), ring_mappings()
    monkeypatch.setattr(shared_frames, "RING_BYTES", 700_000)
    client = start_client(model_dir)
    ring = client._core.frame_ring

    async def main():
        requests = [make_request(client, f"full-{i}", "large_image") for i in range(3)]
        outputs = await asyncio.gather(*(final_output(client, request) for request in requests))
        victim = client.generate(make_request(client, "victim", "large_image", SamplingParams(max_tokens=700)))
        await victim.__anext__()
        os.kill(client.core_pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            async for _ in victim:
                pass
        await client.shutdown(0)
        return outputs

    for output in asyncio.run(main()):
        assert_matches(output, reference["large_image"])
    assert ring.num_shared >= 1 and ring.num_inline_ring_full >= 1
    assert ring_mappings() == maps_before and shm_entries() <= shm_before
