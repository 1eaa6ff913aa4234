"""uvicorn's h11 protocol, answering malformed HTTP with the status h11 suggests and an OpenAI
error body: 431 when the request line + headers exceed --h11-max-incomplete-event-size (uvicorn
itself answers every protocol error with a plain-text 400).

Caller: app.server.serve passes `H11StatusHintProtocol` as uvicorn's `http` protocol class.
"""

from __future__ import annotations

import h11
import msgspec
from uvicorn.protocols.http.h11_impl import H11Protocol

from app.protocol import ErrorInfo, ErrorResponse

_MESSAGES = {431: "the request headers are too large for this server (--h11-max-incomplete-event-size)"}
_REASONS = {400: b"Bad Request", 413: b"Content Too Large", 414: b"URI Too Long",
            431: b"Request Header Fields Too Large"}


class _HintKeepingConnection(h11.Connection):
    """Remembers the status hint of the last protocol error it raised. h11 bounds only a head that
    is still INCOMPLETE; a complete head that arrived in one read is measured here too."""

    error_status_hint = 400

    def next_event(self):
        try:
            event = super().next_event()
            if isinstance(event, h11.Request) and _head_size(event) > self._max_incomplete_event_size:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            return event
        except h11.RemoteProtocolError as exc:
            self.error_status_hint = exc.error_status_hint
            raise


def _head_size(request: h11.Request) -> int:
    return len(request.method) + len(request.target) + sum(len(name) + len(value) + 4
                                                           for name, value in request.headers.raw_items())


class H11StatusHintProtocol(H11Protocol):
    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn: _HintKeepingConnection = _HintKeepingConnection(h11.SERVER, config.h11_max_incomplete_event_size
                                           or h11._connection.DEFAULT_MAX_INCOMPLETE_EVENT_SIZE)

    def send_400_response(self, msg: str) -> None:
        status = self.conn.error_status_hint if self.conn.error_status_hint in _REASONS else 400
        message = _MESSAGES.get(status, "invalid HTTP request")
        body = msgspec.json.encode(ErrorResponse(error=ErrorInfo(
            message=message, type="invalid_request_error", param=None, code=status)))
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        self.transport.write(self.conn.send(h11.Response(status_code=status, headers=headers,
                                                         reason=_REASONS[status])))
        self.transport.write(self.conn.send(h11.Data(data=body)))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()
