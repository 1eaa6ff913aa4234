"""`--api-key` guard: requests to the API routes must carry `Authorization: Bearer <key>`.

Caller: app.server attaches `require_api_key` to the API controllers (not to /health, /version,
/metrics). Keys are compared with hmac.compare_digest, so timing reveals nothing about them.
"""

from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from app.errors import UnauthorizedError


def _bearer_token(connection: ASGIConnection) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    keys = connection.app.state.serving.config.api_keys
    if not keys:
        return
    token = _bearer_token(connection)
    if token is None:
        raise UnauthorizedError("missing API key: send 'Authorization: Bearer <key>'")
    if not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys):
        raise UnauthorizedError("invalid API key")
