"""`vlserve bench serve [flags]`: load an OpenAI-compatible server (vlserve, vLLM, ...) with random
image chat requests and print vLLM's serving result block (plus images/s); `--save-result` writes
the result JSON that `vllm bench serve` writes.

Caller: app.cli.main. Order of work: wait for /v1/models (the model name, when --model is not
given) -> build every request body (images PNG-encoded, base64, JSON) -> one test request (its own
fresh images, not counted) -> start the clock -> send the requests, at most --max-concurrency in
flight, arrivals spaced by --request-rate (Poisson; gamma with --burstiness) -> stop the clock when
the last stream ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np

from app.benchmark.dataset import (DATASET_NAMES, IMAGE_FORMATS, DatasetConfig, SampleRequest, build_requests,
                                   parse_image_size)
from app.benchmark.metrics import METRIC_TITLES, RunInfo, compute_metrics, per_request_lists, result_block
from app.benchmark.requests import RequestResult, send_request

REQUEST_TIMEOUT_S = 6 * 3600  # as vLLM's client: a benchmark request is never cut short
BACKEND_ENDPOINTS = {"openai-chat": "/v1/chat/completions", "openai": "/v1/completions", "vllm": "/v1/completions"}


def build_parser(prog: str = "vlserve bench serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--base-url", default=None, help="server URL without the endpoint, e.g. http://127.0.0.1:8000 "
        "(default: from --host and --port)")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=8000)
    add("--endpoint", default=None, help="default /v1/chat/completions (/v1/completions takes text only)")
    add("--backend", default=None, choices=sorted(BACKEND_ENDPOINTS), help="picks the default --endpoint")
    add("--model", default=None, help="the model to request (default: the first of /v1/models)")
    add("--served-model-name", default=None, help="name sent as `model` (default: --model)")
    add("--dataset-name", default="random-mm", choices=DATASET_NAMES)
    add("--num-prompts", type=int, default=1000)
    add("--input-len", "--random-input-len", dest="input_len", type=int, default=64,
        help="text tokens per prompt: random letters, about one token each")
    add("--output-len", "--random-output-len", dest="output_len", type=int, default=128)
    add("--image-size", default="448x448", help="WIDTHxHEIGHT of the random images")
    add("--images-per-request", "--random-mm-base-items-per-request", dest="images_per_request", type=int,
        default=1)
    add("--image-format", default="png", choices=sorted(IMAGE_FORMATS))
    add("--ignore-eos", action="store_true", help="send vLLM's ignore_eos: every request makes --output-len tokens")
    add("--temperature", type=float, default=0.0)
    add("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    add("--request-rate", type=float, default=math.inf, help="requests/s, Poisson arrivals (default inf: all at once)")
    add("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps (1: Poisson)")
    add("--seed", type=int, default=0)
    add("--disable-tqdm", action="store_true")
    add("--save-result", action="store_true")
    add("--result-dir", default=None)
    add("--result-filename", default=None)
    add("--label", default=None)
    add("--percentile-metrics", default="ttft,tpot,itl,e2el")
    add("--metric-percentiles", default="99")
    add("--ready-check-timeout-sec", type=int, default=600, help="wait this long for the server to answer")
    return parser


def check_args(args: argparse.Namespace) -> DatasetConfig:
    """ValueError naming the flag; returns the dataset config."""
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency: must be positive, got {args.max_concurrency}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate: must be positive, got {args.request_rate}")
    if not args.burstiness > 0:
        raise ValueError(f"--burstiness: must be positive, got {args.burstiness}")
    unknown = set(args.percentile_metrics.split(",")) - set(METRIC_TITLES)
    if unknown:
        raise ValueError(f"--percentile-metrics: {sorted(unknown)} not among {', '.join(METRIC_TITLES)}")
    try:
        args.metric_percentiles = tuple(float(p) for p in args.metric_percentiles.split(","))
    except ValueError:
        raise ValueError(f"--metric-percentiles: expected numbers such as 50,99, "
                         f"got {args.metric_percentiles!r}") from None
    if not all(0 < p < 100 for p in args.metric_percentiles):
        raise ValueError("--metric-percentiles: each must lie in (0, 100)")
    return DatasetConfig(dataset_name=args.dataset_name, num_prompts=args.num_prompts, input_len=args.input_len,
                         output_len=args.output_len, image_size=parse_image_size(args.image_size),
                         images_per_request=args.images_per_request, image_format=args.image_format, seed=args.seed)


def request_headers() -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key := os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


async def wait_for_model(client: httpx.AsyncClient, base_url: str, timeout_s: float) -> str:
    """The first model of /v1/models, retrying until the server answers or timeout_s passes."""
    deadline, error = time.monotonic() + timeout_s, ""
    while True:
        try:
            response = await client.get(f"{base_url}/v1/models", headers=request_headers())
            if response.status_code == 200:
                return response.json()["data"][0]["id"]
            error = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {base_url} did not answer /v1/models within {timeout_s:g} s ({error})")
        await asyncio.sleep(0.5)


def arrival_gaps(num_requests: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request: 0 for the first, then gamma(burstiness, 1/(rate*burstiness))
    gaps (mean 1/rate; burstiness 1 is a Poisson process). All zero at an infinite rate."""
    if math.isinf(request_rate) or num_requests == 0:
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests - 1)
    return [0.0, *(float(gap) for gap in gaps)]


async def run_load(client: httpx.AsyncClient, url: str, requests: list[SampleRequest], is_chat: bool,
                   args: argparse.Namespace) -> tuple[list[RequestResult], float]:
    """Sends every request (concurrency cap, arrival gaps) -> (results in request order, duration s)."""
    from tqdm.auto import tqdm

    headers = request_headers()
    slots = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    progress = tqdm(total=len(requests), disable=args.disable_tqdm, desc="requests")

    async def one(request: SampleRequest) -> RequestResult:
        if slots is None:
            result = await send_request(client, url, request.body, is_chat, headers)
        else:
            async with slots:
                result = await send_request(client, url, request.body, is_chat, headers)
        progress.update(1)
        return result

    tasks = []
    start = time.perf_counter()
    for request, gap in zip(requests, arrival_gaps(len(requests), args.request_rate, args.burstiness, args.seed)):
        if gap > 0:
            await asyncio.sleep(gap)
        tasks.append(asyncio.ensure_future(one(request)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    progress.close()
    return list(results), duration


async def benchmark(args: argparse.Namespace, dataset: DatasetConfig) -> dict:
    """The whole run -> the result JSON (printed block on stdout)."""
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    endpoint = args.endpoint or BACKEND_ENDPOINTS.get(args.backend, "/v1/chat/completions")
    is_chat = endpoint.rstrip("/").endswith("chat/completions")
    num_connections = args.max_concurrency or dataset.num_prompts
    limits = httpx.Limits(max_connections=num_connections, max_keepalive_connections=num_connections)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=60.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        model = args.model or await wait_for_model(client, base_url, args.ready_check_timeout_sec)
        sampling = {"temperature": args.temperature, **({"ignore_eos": True} if args.ignore_eos else {})}
        print(f"Building {dataset.num_prompts} requests ({dataset.dataset_name}, {dataset.num_images} image(s) "
              f"of {dataset.image_size[0]}x{dataset.image_size[1]} each) ...", flush=True)
        test_request, *requests = await asyncio.to_thread(
            build_requests, dataset, args.served_model_name or model, is_chat, sampling, dataset.num_prompts + 1)
        test = await send_request(client, base_url + endpoint, test_request.body, is_chat, request_headers())
        if not test.success:
            raise RuntimeError(f"the initial test request failed; check the flags and the server: {test.error}")
        print(f"Initial test request done; starting the benchmark (request rate {args.request_rate}, "
              f"max concurrency {args.max_concurrency})", flush=True)
        results, duration = await run_load(client, base_url + endpoint, requests, is_chat, args)
    info = RunInfo(duration_s=duration, num_images_sent=sum(r.num_images for r, out in zip(requests, results)
                                                            if out.success),
                   max_concurrency=args.max_concurrency, request_rate=args.request_rate,
                   percentile_metrics=tuple(args.percentile_metrics.split(",")),
                   metric_percentiles=args.metric_percentiles)
    metrics = compute_metrics(results, info)
    print(result_block(metrics, info), flush=True)
    return {**run_description(args, dataset, model, endpoint), **metrics, **per_request_lists(results)}


def run_description(args: argparse.Namespace, dataset: DatasetConfig, model: str, endpoint: str) -> dict:
    endpoint_type = args.backend or ("openai-chat" if "chat" in endpoint else "openai")
    return {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "endpoint_type": endpoint_type,
            "endpoint": endpoint, "label": args.label, "model_id": model, "num_prompts": dataset.num_prompts,
            "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
            "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
            "dataset_name": dataset.dataset_name, "input_len": dataset.input_len, "output_len": dataset.output_len,
            "image_size": list(dataset.image_size), "images_per_request": dataset.num_images,
            "ignore_eos": args.ignore_eos, "temperature": args.temperature, "seed": args.seed}


def save_result(result: dict, args: argparse.Namespace) -> Path:
    rate = result["request_rate"]
    concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
    name = args.result_filename or (f"{args.label or 'vlserve-bench'}-{rate}qps{concurrency}-"
                                    f"{result['model_id'].rstrip('/').split('/')[-1]}-{result['date']}.json")
    path = Path(args.result_dir or ".") / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return path


def main(argv: list[str], prog: str = "vlserve bench serve") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        dataset = check_args(args)
        result = asyncio.run(benchmark(args, dataset))
    except (ValueError, RuntimeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    if args.save_result:
        print(f"result saved to {save_result(result, args)}")
    return 0
