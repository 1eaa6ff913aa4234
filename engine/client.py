"""The only way callers reach the engine core.

  InprocClient       EngineCore in this process, stepped by the caller (LLM, tests).
  AsyncEngineClient  for the HTTP app: the core runs in a child process (spawn; msgspec msgpack
                     over two one-way multiprocessing Pipes, media frames through a shared-memory
                     ring: engine/shared_frames.py) or, with in_process=True, in a background
                     thread. generate() yields cumulative RequestOutputs.

    event loop ──send_request/abort──▶ [pipe] ──▶ core busy loop: apply messages, step()
    event loop ◀──call_soon_threadsafe── reader thread ◀── [pipe] ◀── EngineOutputs

Where the core runs (thread or process, the pipes, the watchdog): engine/core_host.py.
Engine death (the process exits, or step() raises) is seen at once by the reader thread waiting on
the process sentinel: dead_error is set, every in-flight generate() raises EngineDeadError, and new
requests are refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from engine.config import EngineConfig
from engine.core_host import EngineDeadError, ProcessCore, ThreadCore
from engine.detokenizer import OutputProcessor
from engine.frontend import Frontend
from engine.outputs import RequestOutput
from engine.protocol import EngineOutputs, EngineRequest, FinishReason, SchedulerStats

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngineClient", "EngineDeadError", "InprocClient"]


class InprocClient:
    """EngineCore in this process; the caller drives step(). Used by LLM and tests."""

    def __init__(self, config: EngineConfig, core=None):
        if core is None:
            from engine.core import EngineCore

            core = EngineCore(config)
        self.core = core

    def add_request(self, request: EngineRequest) -> None:
        self.core.add_request(request)

    def abort_requests(self, req_ids: list[str]) -> None:
        if req_ids:
            self.core.abort_requests(req_ids)

    def step(self) -> EngineOutputs:
        return self.core.step()

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def stats(self) -> SchedulerStats:
        return self.core.stats()


# ---------------------------------------------------------------- async facade for the app

class _OutputSlot:
    """The latest cumulative output of one request (older ones are superseded), or an error."""

    def __init__(self) -> None:
        self.latest: RequestOutput | None = None
        self.error: BaseException | None = None
        self.ready = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        self.latest = output
        self.ready.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.ready.set()

    async def get(self) -> RequestOutput:
        await self.ready.wait()
        self.ready.clear()
        if self.error is not None:
            raise self.error
        output, self.latest = self.latest, None
        return output


class AsyncEngineClient:
    def __init__(self, config: EngineConfig, frontend: Frontend):
        self.config = config
        self.frontend = frontend
        self.dead_error: str | None = None
        self.stats: SchedulerStats | None = None
        self._processor = OutputProcessor(frontend.tokenizer)
        self._slots: dict[str, _OutputSlot] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._core: ThreadCore | ProcessCore | None = None
        self._is_accepting = True

    @classmethod
    def start(cls, config: EngineConfig, *, in_process: bool = False, ready_timeout_s: float = 600.0,
              iteration_timeout_s: float | None = None) -> "AsyncEngineClient":
        """Blocks until the core is ready (model loaded, KV cache allocated). Call it before
        serving, or through a worker thread from async code. `iteration_timeout_s`: see ProcessCore."""
        client = cls(config, Frontend(config))
        if in_process:
            client._core = ThreadCore(config, client._outputs_from_core, client._dead_from_core)
        else:
            client._core = ProcessCore(config, client._outputs_from_core, client._dead_from_core, ready_timeout_s,
                                       iteration_timeout_s, is_busy=lambda: bool(client._processor.states),
                                       frame_ring_bytes=None if client.frontend.is_multimodal else 0)
        client.stats = client._core.initial_stats  # block counts before the first step
        return client

    def is_healthy(self) -> bool:
        return self.dead_error is None

    @property
    def core_pid(self) -> int | None:
        """The engine-core process id (None when the core runs in a thread here)."""
        return getattr(self._core, "pid", None)

    # ---- called from the core's thread: hop onto the event loop

    def _outputs_from_core(self, outputs: EngineOutputs) -> None:
        if outputs.stats is not None:
            self.stats = outputs.stats
        if outputs.outputs and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._route_outputs, outputs)

    def _dead_from_core(self, message: str) -> None:
        self.dead_error = message
        logger.error("engine core died: %s", message)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail_all, message)

    # ---- on the event loop

    def _route_outputs(self, outputs: EngineOutputs) -> None:
        states, stop_string_hits = self._processor.process(outputs.outputs)
        if stop_string_hits and self.dead_error is None:
            self._core.send_abort(stop_string_hits)
        for state in states:
            slot = self._slots.get(state.request.req_id)
            if slot is not None:
                slot.put(state.make_output())

    def _fail_all(self, message: str) -> None:
        for req_id, slot in list(self._slots.items()):
            self._processor.abort(req_id, FinishReason.ERROR, message)
            slot.fail(EngineDeadError(message))

    def _check_accepting(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine is not running: {self.dead_error}")
        if not self._is_accepting:
            raise EngineDeadError("the engine is shutting down")

    async def generate(self, request: EngineRequest, *, prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative RequestOutputs of one request (n completions); the last has finished=True.
        Raises EngineDeadError if the engine dies meanwhile. Stopping the iteration early aborts
        the request in the engine."""
        self._check_accepting()
        self._loop = asyncio.get_running_loop()
        state = self._processor.add(request, prompt)
        slot = self._slots[request.req_id] = _OutputSlot()
        finished = False
        try:
            for child in state.children:
                self._core.send_request(child)
            while not finished:
                output = await slot.get()
                finished = output.finished
                yield output
        finally:
            self._slots.pop(request.req_id, None)
            if not finished:
                self._abort_now(request.req_id)

    async def abort(self, request_id: str) -> None:
        """Ends the request now (its generator yields a final "abort" output) and frees its KV
        blocks in the core. Unknown or finished ids are ignored."""
        self._abort_now(request_id)

    def _abort_now(self, request_id: str) -> None:
        state, running_child_ids = self._processor.abort(request_id)
        if running_child_ids and self.dead_error is None:
            try:
                self._core.send_abort(running_child_ids)
            except EngineDeadError:
                pass
        slot = self._slots.get(request_id)
        if state is not None and slot is not None:
            slot.put(state.make_output())

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Refuses new requests, lets in-flight ones finish for up to drain_timeout_s, aborts the
        rest and stops the core."""
        self._is_accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while self._processor.states and self.dead_error is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for req_id in list(self._processor.states):
            self._abort_now(req_id)
        if self._core is not None:
            await asyncio.to_thread(self._core.close, 10.0)
