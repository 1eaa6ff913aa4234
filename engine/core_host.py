"""Where the engine core runs for AsyncEngineClient: a daemon thread of this process (ThreadCore) or
a spawned child process (ProcessCore: msgspec msgpack over two one-way multiprocessing Pipes, a reader
thread delivering outputs, a watchdog for a busy core that stops answering). Both run the same
run_core_loop and report outputs and death through two callbacks; neither knows about asyncio.

ProcessCore's wire (tag byte + msgpack body):
  client -> core  A EngineRequest | M SharedFramesRequest (frames in the shared ring: engine.shared_frames)
                  | X AbortRequests | S (shutdown)
  core -> client  O <ring position consumed: u64 LE> EngineOutputs | R SchedulerStats | F failure
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import struct
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait

import msgspec

from engine.config import EngineConfig
from engine.process_signals import ignore_group_stop_signals
from engine.protocol import AbortRequests, EngineOutputs, EngineRequest, SchedulerStats
from engine.shared_frames import FrameRingReader, FrameRingWriter, SharedFramesRequest

logger = logging.getLogger(__name__)

# Message tags, client -> core and core -> client.
ADD, ADD_SHARED, ABORT, SHUTDOWN = b"A", b"M", b"X", b"S"
OUTPUTS, READY, FAILED = b"O", b"R", b"F"
# OUTPUTS' header after the tag: the frame ring's position the core has consumed up to.
RING_CONSUMED = struct.Struct("<Q")


class EngineDeadError(RuntimeError):
    """The engine core is gone; no request can complete any more."""


def run_core_loop(core, receive: Callable[[bool], list[tuple[bytes, object]]],
                  send: Callable[[EngineOutputs], None]) -> None:
    """The core's busy loop: apply what arrived (waiting only when idle), step while there is
    work. After messages that leave the core idle (aborts), send fresh stats."""
    while True:
        messages = receive(not core.has_unfinished_requests())
        for tag, payload in messages:
            if tag == SHUTDOWN:
                return
            if tag == ADD:
                core.add_request(payload)
            elif tag == ABORT:
                core.abort_requests(payload)
        if core.has_unfinished_requests():
            send(core.step())
        elif messages:
            send(EngineOutputs(stats=core.stats(), timestamp=time.time()))


# ---------------------------------------------------------------- core in a background thread

class ThreadCore:
    """EngineCore in a daemon thread of this process (AsyncEngineClient(in_process=True))."""

    def __init__(self, config: EngineConfig, on_outputs: Callable[[EngineOutputs], None],
                 on_dead: Callable[[str], None]):
        from engine.core import EngineCore

        self._core = EngineCore(config)
        self.initial_stats = self._core.stats()
        self._inbox: queue.Queue = queue.Queue()
        self._on_outputs, self._on_dead = on_outputs, on_dead
        self._thread = threading.Thread(target=self._run, name="vlserve-engine-core", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            run_core_loop(self._core, self._receive, self._on_outputs)
        except BaseException:  # noqa: BLE001 - any failure kills the engine; report it
            self._on_dead(traceback.format_exc())

    def _receive(self, block: bool) -> list[tuple[bytes, object]]:
        messages = [self._inbox.get()] if block else []
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                return messages

    def send_request(self, request: EngineRequest) -> None:
        self._inbox.put((ADD, request))

    def send_abort(self, req_ids: list[str]) -> None:
        self._inbox.put((ABORT, req_ids))

    def close(self, timeout_s: float) -> None:
        self._inbox.put((SHUTDOWN, None))
        self._thread.join(timeout_s)


# ---------------------------------------------------------------- core in a child process

def core_process_main(config: EngineConfig, request_reader, output_writer,
                      frame_ring: FrameRingReader | None = None) -> None:
    """Entry point of the engine-core process (spawned). It leaves on SHUTDOWN or when the
    server's pipe closes, never on the process group's SIGTERM/SIGINT (engine.process_signals)."""
    ignore_group_stop_signals()
    # A spawned process starts with no logging set up: without this its start-up plan (weights, KV cache
    # size and what sized it) would be dropped. No-op when the parent's settings were inherited.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from engine.core import EngineCore

        core = EngineCore(config)
    except BaseException as exc:  # noqa: BLE001 - tell the parent why, then exit
        output_writer.send_bytes(_failure(exc))
        return
    output_writer.send_bytes(READY + msgspec.msgpack.encode(core.stats()))
    endpoint = CoreEndpoint(request_reader, output_writer, frame_ring)
    try:
        run_core_loop(core, endpoint.receive, endpoint.send)
    except BaseException as exc:  # noqa: BLE001
        output_writer.send_bytes(_failure(exc))
        raise SystemExit(1) from None


class CoreEndpoint:
    """The core process' ends of the pipes: decodes what arrives, encodes what leaves."""

    def __init__(self, request_reader, output_writer, frame_ring: FrameRingReader | None) -> None:
        self._reader, self._writer, self._frame_ring = request_reader, output_writer, frame_ring
        self._request_decoder = msgspec.msgpack.Decoder(EngineRequest)
        self._shared_decoder = msgspec.msgpack.Decoder(SharedFramesRequest)
        self._abort_decoder = msgspec.msgpack.Decoder(AbortRequests)
        self._encoder = msgspec.msgpack.Encoder()
        self._output_buffer = bytearray()
        self._num_received = 0   # messages read from the pipe

    def receive(self, block: bool) -> list[tuple[bytes, object]]:
        """Everything queued in the pipe (waiting for a first message when block)."""
        messages: list[tuple[bytes, object]] = []
        if not block and self._frame_ring is not None and self._frame_ring.num_messages_sent() == self._num_received:
            return messages   # nothing new: no poll() syscall on this step
        while self._reader.poll(None if block and not messages else 0):
            data = self._reader.recv_bytes()
            self._num_received += 1
            tag, body = data[:1], memoryview(data)[1:]   # a view: no copy of the body
            payload: object = None
            if tag == ADD:
                payload = self._request_decoder.decode(body)
            elif tag == ADD_SHARED and self._frame_ring is not None:
                tag, payload = ADD, self._frame_ring.receive(self._shared_decoder.decode(body))
            elif tag == ABORT:
                payload = self._abort_decoder.decode(body).req_ids
            messages.append((tag, payload))
        return messages

    def send(self, outputs: EngineOutputs) -> None:
        header = 1 + RING_CONSUMED.size
        self._encoder.encode_into(outputs, self._output_buffer, header)   # reuses one buffer
        self._output_buffer[:1] = OUTPUTS
        RING_CONSUMED.pack_into(self._output_buffer, 1, 0 if self._frame_ring is None else self._frame_ring.consumed)
        self._writer.send_bytes(self._output_buffer)


def _failure(exc: BaseException) -> bytes:
    return FAILED + msgspec.msgpack.encode([type(exc).__name__, str(exc), traceback.format_exc()])


class ProcessCore:
    """EngineCore in a spawned child process; a reader thread delivers its messages."""

    def __init__(self, config: EngineConfig, on_outputs: Callable[[EngineOutputs], None],
                 on_dead: Callable[[str], None], ready_timeout_s: float = 600.0,
                 iteration_timeout_s: float | None = None, is_busy: Callable[[], bool] = lambda: False,
                 frame_ring_bytes: int | None = None):
        """iteration_timeout_s: while is_busy() (requests in flight), a core that sends nothing for
        this long is taken as hung (a stuck kernel, a deadlock): it is killed and reported dead.
        frame_ring_bytes: room for media frames in shared memory (default shared_frames.RING_BYTES;
        0 for a text-only model: the ring then only carries the sent-messages count)."""
        context = multiprocessing.get_context("spawn")
        request_reader, self._request_writer = context.Pipe(duplex=False)
        self._output_reader, output_writer = context.Pipe(duplex=False)
        self.frame_ring = FrameRingWriter.create(frame_ring_bytes)   # None: frames go inline (no memfd here)
        ring_for_child = None if self.frame_ring is None else self.frame_ring.for_child()
        self._process = context.Process(target=core_process_main,
                                        args=(config, request_reader, output_writer, ring_for_child),
                                        name="vlserve-engine-core", daemon=True)
        try:
            self._process.start()
        finally:
            request_reader.close()
            output_writer.close()
            if self.frame_ring is not None:
                self.frame_ring.close_descriptor()
        self._on_outputs, self._on_dead = on_outputs, on_dead
        self._encoder = msgspec.msgpack.Encoder()
        # Encoding and writes go through a sender thread, off the event loop (a request's frames are
        # copied into the shared ring there). FIFO, so an abort never overtakes its request.
        self._outbox: queue.SimpleQueue[EngineRequest | bytes | None] = queue.SimpleQueue()
        self._send_error: str | None = None
        self._closing = False
        self._iteration_timeout_s, self._is_busy = iteration_timeout_s, is_busy
        self._last_activity = time.monotonic()
        self._wait_ready(ready_timeout_s)
        self._reader = threading.Thread(target=self._read_loop, name="vlserve-core-reader", daemon=True)
        self._reader.start()
        self._sender = threading.Thread(target=self._send_loop, name="vlserve-core-sender", daemon=True)
        self._sender.start()

    def _wait_ready(self, timeout_s: float) -> None:
        if not wait([self._output_reader, self._process.sentinel], timeout_s):
            self._process.kill()
            raise RuntimeError(f"the engine core did not start within {timeout_s:.0f} s")
        data = self._output_reader.recv_bytes() if self._output_reader.poll(0) else b""
        if data[:1] == READY:
            self.initial_stats = msgspec.msgpack.decode(data[1:], type=SchedulerStats)
            return
        self._process.join(5)
        if data[:1] == FAILED:
            kind, message, trace = msgspec.msgpack.decode(data[1:])
            logger.error("engine core failed to start:\n%s", trace)
            raise (ValueError if kind == "ValueError" else RuntimeError)(message)
        raise RuntimeError(f"the engine core process exited during startup (code {self._process.exitcode})")

    def _read_loop(self) -> None:
        """Delivers messages until the process ends; then reports its death (unless closed)."""
        decoder = msgspec.msgpack.Decoder(EngineOutputs)
        poll_s = None if self._iteration_timeout_s is None else min(1.0, self._iteration_timeout_s / 4)
        while True:
            ready = wait([self._output_reader, self._process.sentinel], poll_s)
            if not ready:
                if self._stalled():
                    return
                continue
            self._last_activity = time.monotonic()
            data = b""
            if self._output_reader in ready:  # data, or EOF; drained before the sentinel counts
                try:
                    data = self._output_reader.recv_bytes()
                except (EOFError, OSError):
                    data = b""
            if data[:1] == OUTPUTS:
                if self.frame_ring is not None:
                    self.frame_ring.acknowledge(RING_CONSUMED.unpack_from(data, 1)[0])
                self._on_outputs(decoder.decode(memoryview(data)[1 + RING_CONSUMED.size:]))
                continue
            if data[:1] == FAILED:
                kind, message, trace = msgspec.msgpack.decode(data[1:])
                logger.error("engine core failed:\n%s", trace)
                self._report_dead(f"the engine core failed: {kind}: {message}")
                return
            if data:
                continue
            self._process.join(1)
            self._report_dead(f"the engine core process exited (exit code {self._process.exitcode})")
            return

    def _stalled(self) -> bool:
        """Kills a busy core that has been silent past the iteration timeout; True if it did."""
        now = time.monotonic()
        if not self._is_busy():
            self._last_activity = now  # an idle core owes nothing: silence counts only while busy
            return False
        silent_s = now - self._last_activity
        if silent_s < self._iteration_timeout_s:
            return False
        self._process.kill()
        self._process.join(5)
        self._report_dead(f"the engine core stopped answering: no step finished in {silent_s:.0f} s "
                          f"(--engine-iteration-timeout {self._iteration_timeout_s:g}); it was stopped")
        return True

    def _report_dead(self, message: str) -> None:
        if not self._closing:
            self._on_dead(message)

    def send_request(self, request: EngineRequest) -> None:
        self._send(request)   # encoded by the sender thread

    def send_abort(self, req_ids: list[str]) -> None:
        self._send(ABORT + self._encoder.encode(AbortRequests(req_ids)))

    def _send(self, message: EngineRequest | bytes) -> None:
        """Queues a message for the sender thread; never blocks on the pipe."""
        if self._send_error is not None:
            raise EngineDeadError(f"the engine core is not running: {self._send_error}")
        self._outbox.put(message)

    def _encode_request(self, request: EngineRequest) -> bytes:
        shared = None if self.frame_ring is None else self.frame_ring.share(request)
        return ADD + self._encoder.encode(request) if shared is None else ADD_SHARED + self._encoder.encode(shared)

    def _send_loop(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                data = self._encode_request(message) if isinstance(message, EngineRequest) else message
                self._request_writer.send_bytes(data)
                if self.frame_ring is not None:
                    self.frame_ring.note_message_sent()
            except (BrokenPipeError, OSError) as exc:  # the reader thread reports the death
                self._send_error = str(exc) or type(exc).__name__
                return

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def close(self, timeout_s: float) -> None:
        self._closing = True
        self._outbox.put(SHUTDOWN)
        self._outbox.put(None)  # the sender thread ends after writing what was queued
        self._sender.join(timeout_s)
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._sender.join(1.0)   # the pipe is closed now: a sender still writing fails at once
        if self.frame_ring is not None and not self._sender.is_alive():
            self.frame_ring.close()   # the core's mapping went with its process
