"""Overload control: refuse a request with 503 BEFORE its media are fetched or decoded when too
many requests are already waiting, or too many media bytes are already queued.

Caller: the chat / completions route handlers enter `Admission.admit(num_body_bytes)` first thing
(an `async with`), and app.serving marks a request `waiting_for_engine` from its submission until
its first output. A request counts as waiting while it is being preprocessed (admission scope) and
while it is in the engine without any output yet; both counts are tied to scopes that always end
(`async with` / generator `finally`), so they cannot leak. vLLM has no equivalent of these caps.

    queued media bytes = request bodies + fetched media of the requests being preprocessed
"""

from __future__ import annotations

from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass


class OverloadedError(Exception):
    """The server is over a waiting-request or queued-media cap (503; clients may retry later)."""


class RequestTimeoutError(Exception):
    """A request waited longer than --request-timeout for the engine (503)."""


@dataclass
class Ticket:
    """One admitted request's share of the queued media bytes."""

    num_media_bytes: int = 0


class Admission:
    def __init__(self, max_waiting_requests: int, max_queued_media_bytes: int):
        self.max_waiting_requests = max_waiting_requests
        self.max_queued_media_bytes = max_queued_media_bytes
        self.num_preprocessing = 0
        self.num_in_engine_waiting = 0
        self.num_queued_media_bytes = 0

    @property
    def num_waiting(self) -> int:
        return self.num_preprocessing + self.num_in_engine_waiting

    def check(self, num_body_bytes: int) -> None:
        if self.num_waiting >= self.max_waiting_requests:
            raise OverloadedError(f"the server is overloaded: {self.num_waiting} requests are waiting "
                                  f"(--max-waiting-requests {self.max_waiting_requests}); retry later")
        if self.num_queued_media_bytes + num_body_bytes > self.max_queued_media_bytes and self.num_preprocessing:
            raise OverloadedError(f"the server is overloaded: too many media bytes are queued "
                                  f"(--max-queued-media-bytes {self.max_queued_media_bytes}); retry later")

    @asynccontextmanager
    async def admit(self, num_body_bytes: int):
        """Scope of one request's preprocessing (validation, fetch, decode, processing)."""
        self.check(num_body_bytes)
        ticket = Ticket(num_body_bytes)
        self.num_preprocessing += 1
        self.num_queued_media_bytes += num_body_bytes
        try:
            yield ticket
        finally:
            self.num_preprocessing -= 1
            self.num_queued_media_bytes -= ticket.num_media_bytes

    def add_media_bytes(self, ticket: Ticket | None, num_bytes: int) -> None:
        if ticket is not None:
            ticket.num_media_bytes += num_bytes
            self.num_queued_media_bytes += num_bytes

    @contextmanager
    def waiting_for_engine(self):
        """Yields a callable that ends the waiting state (first output); idempotent."""
        self.num_in_engine_waiting += 1
        is_waiting = [True]

        def stop_waiting() -> None:
            if is_waiting[0]:
                is_waiting[0] = False
                self.num_in_engine_waiting -= 1

        try:
            yield stop_waiting
        finally:
            stop_waiting()


def body_size(http_request) -> int:
    """The request's declared body size (Content-Length; 0 when absent or malformed)."""
    declared = http_request.headers.get("content-length", "")
    return int(declared) if declared.isdigit() else 0
