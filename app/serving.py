"""ServingContext: what every route handler needs (config, engine client, fetcher, metrics), and
the one place that runs a request through the engine client.

Caller: app.server builds one per app and injects it with `Provide`; route handlers call
`resolve_model`, `outputs` (streaming) or `final_output` (collect). `outputs` owns the request's
lifetime: it aborts the request in the engine when the consumer goes away (client disconnect,
cancelled stream) so its KV blocks are freed at once, records metrics, and logs one line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from litestar import Request

from app.admission import Admission, RequestTimeoutError, Ticket, body_size
from app.errors import ClientDisconnected, EngineDeadError, ModelNotFoundError
from app.metrics import RequestTiming, ServerMetrics
from app.protocol import random_id
from app.server_config import ServerConfig
from engine.client import EngineDeadError as EngineClientDeadError

logger = logging.getLogger("vlserve.requests")


@dataclass
class ServingContext:
    config: ServerConfig
    client: Any                 # engine.client.AsyncEngineClient (tests: a double with its interface)
    metrics: ServerMetrics
    fetcher: Any                # vision.fetch.MediaFetcher
    chat_template: str | None   # --chat-template, else the tokenizer's, else the bundled default
    max_model_len: int
    admission: Admission | None = None  # built from the config when not given
    image_decoder: Any = None   # vision.decode_pool.ImageDecodePool; None: images decode in threads

    def __post_init__(self) -> None:
        if self.admission is None:
            self.admission = Admission(self.config.max_waiting_requests, self.config.max_queued_media_bytes)

    def resolve_model(self, requested: str | None) -> str:
        names = self.config.served_names
        if not requested:
            return names[0]
        if requested not in names:
            raise ModelNotFoundError(f"The model `{requested}` does not exist (served: {', '.join(names)})")
        return requested

    def check_healthy(self) -> None:
        if not self.client.is_healthy():
            raise EngineDeadError(f"the engine is not running: {self.client.dead_error or 'stopped'}")

    @asynccontextmanager
    async def admitted(self, http_request: Request, model: str | None,
                       id_prefix: str) -> AsyncIterator[tuple[str, str, Ticket]]:
        """The opening every generating handler shares -> (served model name, request id, ticket):
        the name checked (404), the engine's health (503), then admission under the overload
        limits (503, before any media is fetched); the ticket is held until the block ends."""
        name = self.resolve_model(model)
        request_id = random_id(id_prefix)
        self.check_healthy()
        async with self.admission.admit(body_size(http_request)) as ticket:
            yield name, request_id, ticket

    async def outputs(self, engine_request: Any, prompt: str | None = None,
                      ticket: Ticket | None = None) -> AsyncIterator[Any]:
        """Cumulative RequestOutputs of one request; aborts it if the consumer stops early. The
        first output must come within --request-timeout; it releases the admission ticket."""
        self.check_healthy()
        timing, last = RequestTiming(arrival=time.monotonic()), None
        generator = self._generate(engine_request, prompt)
        try:
            output = await self._first_output(generator)
            if ticket is not None:
                ticket.release()
            while output is not None:
                if timing.first_token is None and any(c.token_ids for c in output.outputs):
                    timing.first_token = time.monotonic()
                if output.error:
                    raise ValueError(output.error)
                last = output
                yield output
                output = await anext(generator, None)
        finally:
            timing.finished = time.monotonic()
            with anyio.CancelScope(shield=True):
                await generator.aclose()
                if last is None or not last.finished:
                    await self.client.abort(engine_request.req_id)
            self._record(engine_request.req_id, timing, last)

    async def _first_output(self, generator: AsyncGenerator[Any, None]) -> Any:
        timeout_s = self.config.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await anext(generator, None)
        except TimeoutError:
            raise RequestTimeoutError(f"the request waited more than {timeout_s:g} s for the engine "
                                      f"(--request-timeout); the server is busy, retry later") from None

    async def _generate(self, engine_request: Any, prompt: str | None) -> AsyncGenerator[Any, None]:
        try:
            async for output in self.client.generate(engine_request, prompt=prompt):
                yield output
        except (ValueError, asyncio.CancelledError, GeneratorExit):
            raise
        except EngineClientDeadError as exc:
            raise EngineDeadError(str(exc)) from None
        except Exception as exc:
            if not self.client.is_healthy():
                raise EngineDeadError(f"the engine died: {self.client.dead_error or type(exc).__name__}") from None
            raise

    async def final_outputs(self, engine_requests: list[tuple[Any, str | None]],
                            http_request: Request | None, ticket: Ticket | None = None) -> list[Any]:
        """(EngineRequest, prompt text) pairs -> their finished RequestOutputs; a client disconnect
        aborts them all."""
        async def collect(engine_request: Any, prompt: str | None) -> Any:
            last = None
            async for output in self.outputs(engine_request, prompt, ticket):
                last = output
            return last

        work = asyncio.ensure_future(asyncio.gather(*(collect(r, p) for r, p in engine_requests)))
        if http_request is None:
            return await work
        watcher = asyncio.ensure_future(_wait_for_disconnect(http_request))
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            watcher.cancel()
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise ClientDisconnected(", ".join(r.req_id for r, _ in engine_requests))

    def _record(self, req_id: str, timing: RequestTiming, last: Any) -> None:
        num_prompt = len(last.prompt_token_ids) if last else 0
        num_generated = sum(len(c.token_ids) for c in last.outputs) if last else 0
        reasons = [c.finish_reason or "abort" for c in last.outputs] if last else ["abort"]
        self.metrics.observe_request(timing, num_prompt, num_generated, reasons)
        if self.config.disable_log_requests:
            return
        prompt = ""
        if last is not None and last.prompt and self.config.max_log_len is not None:
            prompt = f" prompt={last.prompt[:self.config.max_log_len]!r}"
        ttft = f"{timing.first_token - timing.arrival:.3f}s" if timing.first_token else "-"
        logger.info("%s: prompt_tokens=%d generated_tokens=%d finish=%s ttft=%s e2e=%.3fs%s", req_id,
                    num_prompt, num_generated, ",".join(reasons), ttft, timing.finished - timing.arrival, prompt)


async def _wait_for_disconnect(http_request: Request) -> None:
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            return
