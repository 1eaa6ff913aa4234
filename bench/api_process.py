"""API-process costs on the CPU (no GPU needed): what one 448x448 PNG image request and one streamed
token cost the HTTP server's process, and how long its event loop stalls under a burst of images.

  1. per image, CPU ms by stage (median; the old base64 and PNG-header code re-run for "before")
  2. event-loop lag (a 1 ms ticker's overshoot) while N image data URLs load through app.media:
     decode in threads vs in the worker-process pool (--media-decode-workers)
  3. a 600 KB request written to a core that reads between 20 ms steps: the writer's wait
  4. per token: incremental detokenization + cumulative RequestOutput, and the SSE chunk (msgspec)

    python bench/api_process.py [--model-dir samples/models/out/qwen2_5_vl] [--burst 48] [--workers 2]
Caller: by hand (numbers for BENCHMARKS.md / issue 14). Not imported by the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import multiprocessing
import re
import statistics
import time
from types import SimpleNamespace

import numpy as np
from PIL import Image

import harness  # noqa: F401 - puts the repo on sys.path

from app.media import load_media
from app.streaming import ChatStreamFormat, ChoiceProgress
from engine.config_loader import create_engine_config
from engine.detokenizer import OutputProcessor
from engine.frontend import Frontend, MediaInput
from engine.protocol import EngineOutput, FinishReason
from engine.sampling_params import SamplingParams
from vision.decode_pool import ImageDecodePool
from vision.fetch import FetchConfig, MediaFetcher, decode_data_url
from vision.image import decode_image, header_size
from vision.limits import MultiModalLimits


def png_data_url(seed: int, size: int = 448) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def cpu_ms(fn, repeats: int = 15) -> float:
    """Median CPU time of this thread (robust to other processes on a shared box)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        samples.append(time.thread_time() - start)
    return statistics.median(samples) * 1e3


def old_base64(url: str) -> bytes:  # vision/fetch.py before this change
    compact = re.sub(r"\s+", "", url.partition(",")[2])
    return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)


def old_header(data: bytes) -> tuple[int, int]:  # getexif() on a PNG decodes every pixel
    image = Image.open(io.BytesIO(data))
    image.getexif()
    return image.size


def image_stages(frontend: Frontend) -> list[tuple[str, float]]:
    url = png_data_url(0)
    data = decode_data_url(url, 1 << 30)
    image = decode_image(data)
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + "a " * 64 + "<|im_end|>\n"
    params = SamplingParams(temperature=0, max_tokens=128)
    make = lambda: frontend.make_request("r", prompt, [MediaInput(modality="image", data=image)], params,  # noqa
                                         add_special_tokens=False)
    return [("base64, before (regex strip + b64decode validate)", cpu_ms(lambda: old_base64(url))),
            ("base64, after (binascii strict, strip only if needed)", cpu_ms(lambda: decode_data_url(url, 1 << 30))),
            ("PNG header size, before (getexif loads pixels)", cpu_ms(lambda: old_header(data))),
            ("PNG header size, after", cpu_ms(lambda: header_size(data))),
            ("decode_image (PNG inflate, RGB)", cpu_ms(lambda: decode_image(data))),
            ("make_request (tokenize, process, hash, to_item)", cpu_ms(make))]


async def loop_lag(urls: list[str], pool: ImageDecodePool | None) -> dict:
    lags, done = [], asyncio.Event()

    async def ticker():
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append((time.perf_counter() - start - 0.001) * 1e3)

    tick = asyncio.ensure_future(ticker())
    fetcher, limits = MediaFetcher(FetchConfig()), MultiModalLimits.parse({"image": 1})
    refs = [[SimpleNamespace(modality="image", url=url, data=None, uuid=None, detail=None)] for url in urls]
    start = time.perf_counter()
    await asyncio.gather(*(load_media(r, fetcher, limits, pool=pool) for r in refs))
    elapsed = time.perf_counter() - start
    done.set()
    await tick
    return {"images/s": len(urls) / elapsed, "lag p50 ms": float(np.median(lags)),
            "lag p99 ms": float(np.percentile(lags, 99)), "lag max ms": max(lags)}


def _slow_reader(reader, num_messages: int) -> None:
    for _ in range(num_messages):
        time.sleep(0.02)  # one engine step
        reader.recv_bytes()


def pipe_wait_ms(num_messages: int = 11) -> float:
    """Median time send_bytes(600 KB) blocks when the core reads once per 20 ms step (the first
    send, which waits for the spawned reader to start, is left out)."""
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    child = context.Process(target=_slow_reader, args=(reader, num_messages))
    child.start()
    payload, waits = b"x" * 600_000, []
    for _ in range(num_messages):
        start = time.perf_counter()
        writer.send_bytes(payload)
        waits.append(time.perf_counter() - start)
    child.join()
    return statistics.median(waits[1:]) * 1e3


def per_token_us(frontend: Frontend, num_requests: int = 64, num_tokens: int = 128) -> dict:
    processor, rng = OutputProcessor(frontend.tokenizer), np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
    for i in range(num_requests):
        processor.add(frontend.make_request(f"r{i}", "a b c d e f g h", [], params), None)
    vocab = min(frontend.tokenizer.vocab_size, 5000)
    formats = [ChatStreamFormat(f"r{i}", "m", 1, False, None, False, frontend.tokenizer) for i in range(num_requests)]
    progress = [ChoiceProgress() for _ in range(num_requests)]
    detok_s = sse_s = 0.0
    for step in range(num_tokens):
        finish = FinishReason.LENGTH if step == num_tokens - 1 else None
        outputs = [EngineOutput(req_id=f"r{i}", new_token_ids=[int(rng.integers(100, vocab))], finish_reason=finish)
                   for i in range(num_requests)]
        start = time.thread_time()
        states, _ = processor.process(outputs)
        request_outputs = [state.make_output() for state in states]
        middle = time.thread_time()
        for output, fmt, prog in zip(request_outputs, formats, progress):
            choice = fmt.delta_choice(output.outputs[0], prog)
            if choice is not None:
                fmt.chunk([choice])
        detok_s, sse_s = detok_s + middle - start, sse_s + time.thread_time() - middle
    total = num_requests * num_tokens
    return {"detokenize + RequestOutput us/token": detok_s / total * 1e6, "SSE chunk us/token": sse_s / total * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="samples/models/out/qwen2_5_vl")
    parser.add_argument("--burst", type=int, default=48, help="images loaded at once for the lag test")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    frontend = Frontend(create_engine_config(model=args.model_dir, device="cpu", max_model_len=4096))
    harness.print_table("per 448x448 PNG image, CPU ms", image_stages(frontend))
    urls = [png_data_url(seed) for seed in range(1, args.burst + 1)]
    pool = ImageDecodePool(args.workers)
    asyncio.run(loop_lag(urls[:4], pool))  # spawn and warm the workers
    rows = []
    for name, chosen in (("threads", None), (f"{args.workers} worker processes", pool)):
        for key, value in asyncio.run(loop_lag(urls, chosen)).items():
            rows.append((f"{name}: {key}", value))
    pool.close()
    harness.print_table(f"event loop while {args.burst} images load at once", rows)
    harness.print_table("600 KB request to a core reading every 20 ms", [("send_bytes wait ms", pipe_wait_ms())])
    harness.print_table("per streamed token (64 requests x 128 tokens)", list(per_token_us(frontend).items()))


if __name__ == "__main__":
    main()
