"""Error taxonomy -> OpenAI error JSON + HTTP status, as Litestar exception handlers.

Caller: app.server.create_app registers `EXCEPTION_HANDLERS`. Handlers raise plain domain errors
(ValueError for bad input, the classes below for the rest); this module alone decides the status
and the body `{"error": {"message", "type", "param", "code"}}`. Messages never carry a stack trace;
deterministic bad input (bad JSON, wrong types, out-of-range values) is always a 4xx.
"""

from __future__ import annotations

import logging

import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

from app.admission import OverloadedError, RequestTimeoutError
from app.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("vlserve.app")

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
    415: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
    503: "service_unavailable",
}


class ModelNotFoundError(Exception):
    """The request names a model this server does not serve (404)."""


class EngineDeadError(Exception):
    """The engine process died or is shutting down (503)."""


class ClientDisconnected(Exception):
    """The HTTP client went away before the response was ready (nobody reads the reply)."""


class UnauthorizedError(Exception):
    """Missing or wrong API key (401)."""


def error_response(status: int, message: str, param: str | None = None) -> Response[bytes]:
    body = ErrorResponse(error=ErrorInfo(message=message, type=_TYPES.get(status, "server_error"),
                                         param=param, code=status))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return Response(msgspec.json.encode(body), status_code=status, media_type=MediaType.JSON,
                    headers=headers)


def _validation_message(exc: ValidationException) -> tuple[str, str | None]:
    details = exc.extra if isinstance(exc.extra, list) else []
    for detail in details:
        if isinstance(detail, dict) and detail.get("message"):
            key = detail.get("key")
            return (f"{detail['message']} (field: {key})" if key else str(detail["message"])), key
    return "invalid request body: " + str(exc.detail), None


def _on_validation(_: Request, exc: ValidationException) -> Response[bytes]:
    message, param = _validation_message(exc)
    return error_response(400, message, param)


def _on_http(_: Request, exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    if status >= 500:
        logger.error("HTTP %d: %s", status, exc.detail)
    return error_response(status, str(exc.detail))


def _on_value_error(_: Request, exc: ValueError) -> Response[bytes]:
    return error_response(400, str(exc) or "invalid request")


def _on_decode_error(_: Request, exc: msgspec.DecodeError) -> Response[bytes]:
    return error_response(400, f"invalid request: {exc}")


def _on_unexpected(_: Request, exc: Exception) -> Response[bytes]:
    logger.exception("unexpected error while serving a request")
    return error_response(500, f"internal server error ({type(exc).__name__})")


EXCEPTION_HANDLERS = {
    ValidationException: _on_validation,
    msgspec.DecodeError: _on_decode_error,
    ValueError: _on_value_error,
    ModelNotFoundError: lambda _, exc: error_response(404, str(exc), "model"),
    UnauthorizedError: lambda _, exc: error_response(401, str(exc)),
    EngineDeadError: lambda _, exc: error_response(503, str(exc)),
    OverloadedError: lambda _, exc: error_response(503, str(exc)),
    RequestTimeoutError: lambda _, exc: error_response(503, str(exc)),
    ClientDisconnected: lambda _, exc: error_response(400, "client disconnected"),
    HTTPException: _on_http,
    Exception: _on_unexpected,
}
