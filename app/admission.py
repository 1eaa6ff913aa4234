"""Overload control: refuse a request with 503 BEFORE its media are fetched or decoded when too
many requests are already waiting, or too many media bytes are already queued.

Caller: the chat / completions route handlers enter `Admission.admit(num_body_bytes)` first thing
(an `async with` around the whole handler) and hand the Ticket to app.serving, which releases it
at the request's first output. A request thus counts as waiting from admission (preprocessing,
fetch, decode, the engine's queue) until its first token; the `async with` guarantees the release,
so counts cannot leak. Streamed /v1/completions release at the end of preprocessing. vLLM has no
equivalent of these caps.

    queued media bytes = body + fetched media bytes of the waiting requests
"""

from __future__ import annotations

from contextlib import asynccontextmanager


class OverloadedError(Exception):
    """The server is over a waiting-request or queued-media cap (503; clients may retry later)."""


class RequestTimeoutError(Exception):
    """A request waited longer than --request-timeout for the engine (503)."""


class Ticket:
    """One admitted request: it counts as waiting, and its body + fetched media bytes as queued,
    until `release()` (its first output, or the end of the handler, whichever comes first)."""

    def __init__(self, admission: "Admission", num_body_bytes: int):
        self._admission, self.num_media_bytes, self.is_released = admission, num_body_bytes, False
        admission.num_waiting += 1
        admission.num_queued_media_bytes += num_body_bytes

    def add_media_bytes(self, num_bytes: int) -> None:
        if not self.is_released:
            self.num_media_bytes += num_bytes
            self._admission.num_queued_media_bytes += num_bytes

    def release(self) -> None:
        if not self.is_released:
            self.is_released = True
            self._admission.num_waiting -= 1
            self._admission.num_queued_media_bytes -= self.num_media_bytes


class Admission:
    def __init__(self, max_waiting_requests: int, max_queued_media_bytes: int):
        self.max_waiting_requests = max_waiting_requests
        self.max_queued_media_bytes = max_queued_media_bytes
        self.num_waiting = 0
        self.num_queued_media_bytes = 0

    def check(self, num_body_bytes: int) -> None:
        if self.num_waiting >= self.max_waiting_requests:
            raise OverloadedError(f"the server is overloaded: {self.num_waiting} requests are waiting "
                                  f"(--max-waiting-requests {self.max_waiting_requests}); retry later")
        # One request alone is always let in (its size is bounded by the body and media limits).
        if self.num_queued_media_bytes + num_body_bytes > self.max_queued_media_bytes and self.num_waiting:
            raise OverloadedError(f"the server is overloaded: too many media bytes are queued "
                                  f"(--max-queued-media-bytes {self.max_queued_media_bytes}); retry later")

    @asynccontextmanager
    async def admit(self, num_body_bytes: int):
        """Scope of one request's handler; the ticket is released at the latest when it ends."""
        self.check(num_body_bytes)
        ticket = Ticket(self, num_body_bytes)
        try:
            yield ticket
        finally:
            ticket.release()


def body_size(http_request) -> int:
    """The request's declared body size (Content-Length; 0 when absent or malformed)."""
    declared = http_request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else 0
