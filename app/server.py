"""The Litestar app factory and `serve` (uvicorn).

`create_app(engine_kwargs, server_config, client=None)`: controllers (one per resource), the API-key
guard, the OpenAI error handlers, `ServingContext` injected with `Provide`, and a lifespan that
owns the engine client: it builds EngineConfig, starts `AsyncEngineClient` (unless a client was
injected, as tests do), logs the start-up summary, runs the 10-second throughput logger, and on
shutdown (SIGTERM: uvicorn stops accepting and finishes in-flight responses first) drains and stops
the engine. Caller: app.cli.main -> `serve`; tests call `create_app` directly.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Server

from app.chat_templates import default_chat_template
from app.server_config import ServerConfig
from app.errors import EXCEPTION_HANDLERS
from app.metrics import ServerMetrics
from app.routes.chat import ChatController
from app.routes.completions import CompletionsController
from app.routes.docs import swagger_assets_router, swagger_render_plugin
from app.routes.models import ModelsController
from app.routes.ops import OpsController
from app.routes.tokenize import TokenizeController
from app.serving import ServingContext
from app.version import package_version
from engine.config import EngineConfig
from engine.config_loader import create_engine_config
from vision.decode_pool import ImageDecodePool, default_num_workers
from vision.fetch import MediaFetcher

logger = logging.getLogger("vlserve.server")
THROUGHPUT_LOG_INTERVAL_S = 10.0
ENGINE_WATCH_INTERVAL_S = 0.05


def build_serving(server_config: ServerConfig, client: Any) -> ServingContext:
    frontend = client.frontend
    model_config = frontend.config.model_config
    chat_template = server_config.chat_template
    if chat_template is None and not frontend.chat_template:
        chat_template = default_chat_template(model_config.architecture)
    fetcher = MediaFetcher(server_config.fetch_config())
    num_workers = server_config.media_decode_workers
    num_workers = default_num_workers() if num_workers is None else num_workers
    return ServingContext(config=server_config, client=client, metrics=ServerMetrics(server_config.served_names[0]),
                          fetcher=fetcher, chat_template=chat_template, max_model_len=model_config.max_model_len,
                          image_decoder=ImageDecodePool(num_workers) if num_workers else None)


async def start_client(engine_config: EngineConfig, iteration_timeout_s: float | None = None) -> Any:
    from engine.client import AsyncEngineClient

    # start() blocks until the core has loaded the model and allocated the KV cache.
    return await asyncio.to_thread(AsyncEngineClient.start, engine_config, iteration_timeout_s=iteration_timeout_s)


def log_startup_summary(serving: ServingContext) -> None:
    engine_config = serving.client.frontend.config
    model, cache = engine_config.model_config, engine_config.cache_config
    num_blocks = getattr(serving.client.stats, "num_total_blocks", 0) or cache.num_gpu_blocks_override
    kv = (f"{num_blocks} blocks x {cache.block_size} tokens = {num_blocks * cache.block_size} tokens"
          if num_blocks else "sized by the engine core (its log line gives blocks and tokens)")
    limits = serving.config.limits
    logger.info("vlserve %s serving %s as %s | dtype %s | device %s | http://%s:%d", package_version(), model.model,
                ", ".join(serving.config.served_names), str(model.dtype).removeprefix("torch."),
                engine_config.device_config.device, serving.config.host, serving.config.port)
    logger.info("KV cache: %s | max_model_len %d | max_num_seqs %d | per prompt: image %d, video %d | "
                "API key %s", kv, model.max_model_len, engine_config.scheduler_config.max_num_seqs,
                limits.max_items("image"), limits.max_items("video"),
                "required" if serving.config.api_keys else "off")
    defaults = model.get_diff_sampling_param()
    if defaults:
        logger.info("default sampling parameters from the generation config (--generation-config %s; requests "
                    "that leave a field unset get it; --generation-config vllm turns this off): %s",
                    model.generation_config, defaults)


async def log_throughput(serving: ServingContext) -> None:
    metrics, last_time = serving.metrics, time.monotonic()
    last_prompt, last_generation = metrics.total_prompt_tokens, metrics.total_generation_tokens
    while True:
        await asyncio.sleep(THROUGHPUT_LOG_INTERVAL_S)
        now = time.monotonic()
        elapsed, stats = now - last_time, serving.client.stats
        logger.info("prompt throughput %.1f tokens/s, generation throughput %.1f tokens/s, running %d, "
                    "waiting %d, KV cache usage %.1f%%",
                    (metrics.total_prompt_tokens - last_prompt) / elapsed,
                    (metrics.total_generation_tokens - last_generation) / elapsed,
                    getattr(stats, "num_running_reqs", 0), getattr(stats, "num_waiting_reqs", 0),
                    100 * getattr(stats, "kv_cache_usage", 0.0))
        last_time, last_prompt, last_generation = now, metrics.total_prompt_tokens, metrics.total_generation_tokens


async def watch_engine(serving: ServingContext, on_engine_death: Callable[[], None] | None) -> None:
    """Engine death -> (unless --keep-serving-on-engine-death) `on_engine_death`, which makes
    `serve` stop uvicorn and exit 1 so a service manager restarts the server. /health already
    answers 503 and in-flight requests have failed (the client saw the death first)."""
    while serving.client.is_healthy():
        await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
    if serving.config.exit_on_engine_death and on_engine_death is not None:
        logger.error("the engine died (%s); stopping the server (exit status 1)", serving.client.dead_error)
        on_engine_death()


def make_lifespan(engine_kwargs: dict, server_config: ServerConfig, client: Any, engine_config: EngineConfig | None,
                  on_engine_death: Callable[[], None] | None = None):
    @asynccontextmanager
    async def lifespan(app: Litestar):
        is_owned = client is None
        engine_client = client
        if is_owned:
            config = engine_config or await asyncio.to_thread(lambda: create_engine_config(**engine_kwargs))
            engine_client = await start_client(config, server_config.engine_iteration_timeout_s)
        serving = build_serving(server_config, engine_client)
        app.state.serving = serving
        log_startup_summary(serving)
        ticker = None if server_config.disable_log_stats else asyncio.ensure_future(log_throughput(serving))
        watcher = asyncio.ensure_future(watch_engine(serving, on_engine_death))
        try:
            yield
        finally:
            watcher.cancel()
            if ticker is not None:
                ticker.cancel()
            if serving.image_decoder is not None:
                serving.image_decoder.close()
            if is_owned:
                await engine_client.shutdown(server_config.drain_timeout_s)

    return lifespan


def _serving_from_state(state: State) -> ServingContext:
    return state.serving


def create_app(engine_kwargs: dict, server_config: ServerConfig, client: Any = None, *,
               engine_config: EngineConfig | None = None,
               on_engine_death: Callable[[], None] | None = None) -> Litestar:
    return Litestar(
        route_handlers=[ChatController, CompletionsController, ModelsController, TokenizeController, OpsController,
                        swagger_assets_router()],
        dependencies={"serving": Provide(_serving_from_state, sync_to_thread=False)},
        lifespan=[make_lifespan(engine_kwargs, server_config, client, engine_config, on_engine_death)],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]  # Litestar's handler map type is invariant
        cors_config=CORSConfig(allow_origins=list(server_config.allowed_origins),
                               allow_methods=list(server_config.allowed_methods),  # type: ignore[arg-type]
                               allow_headers=list(server_config.allowed_headers),
                               allow_credentials=server_config.allow_credentials),
        # --root-path: the proxy strips the prefix (Litestar drops scope["root_path"] from the
        # path); the schema names it as the server URL, as FastAPI does for vLLM.
        openapi_config=OpenAPIConfig(title="vlserve", version=package_version(), path="/docs",
                                     servers=[Server(url=server_config.root_path or "/")],
                                     render_plugins=[swagger_render_plugin()]),
        request_max_body_size=server_config.request_max_body_size,
        logging_config=None,  # `serve` configures logging once; the app never rewires handlers
        debug=False,
    )


def serve(engine_kwargs: dict, server_config: ServerConfig, listener: socket.socket | None = None) -> int:
    """Validate the engine configuration (a clear error before anything loads), then run uvicorn
    (on `listener`, bound by the caller before the model loads, else on host:port)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine_config = create_engine_config(**engine_kwargs)
    except (ValueError, TypeError) as exc:
        print(f"vlserve: error: {exc}", file=sys.stderr)
        return 2
    engine_died: list[bool] = []
    server: uvicorn.Server | None = None

    def on_engine_death() -> None:
        engine_died.append(True)
        server.should_exit = True

    app = create_app(engine_kwargs, server_config, engine_config=engine_config, on_engine_death=on_engine_death)
    server = uvicorn.Server(uvicorn_config(app, server_config))
    # uvicorn catches SIGTERM itself (stop accepting, finish in-flight responses, run the lifespan
    # shutdown that drains the engine), then re-raises it under the handler found at start: make
    # that one a no-op so a drained SIGTERM ends with exit status 0, as service managers expect.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run(sockets=[listener] if listener is not None else None)
    return 1 if engine_died else 0


def uvicorn_config(app: Litestar, server_config: ServerConfig, **overrides: Any):
    """The uvicorn settings of `serve` (also used by tests that run the server in a thread)."""
    import uvicorn

    from app.http_protocol import H11StatusHintProtocol

    settings = dict(host=server_config.host, port=server_config.port, log_level=server_config.uvicorn_log_level,
                    timeout_graceful_shutdown=int(server_config.drain_timeout_s), http=H11StatusHintProtocol,
                    h11_max_incomplete_event_size=server_config.h11_max_incomplete_event_size, lifespan="on",
                    ssl_keyfile=server_config.ssl_keyfile, ssl_certfile=server_config.ssl_certfile,
                    ssl_ca_certs=server_config.ssl_ca_certs, root_path=server_config.root_path or "")
    return uvicorn.Config(app, **{**settings, **overrides})
