"""Operations endpoints, open without an API key: /health (200, or 503 when the engine is dead),
/version, /metrics (Prometheus text), /openapi.json.

Caller: Litestar (registered by app.server).
"""

from __future__ import annotations

from litestar import Controller, MediaType, Request, Response, get
from litestar.di import NamedDependency
from prometheus_client import CONTENT_TYPE_LATEST

from app.errors import EngineDeadError
from app.protocol import VersionResponse
from app.serving import ServingContext
from app.version import package_version

# Litestar appends "; charset=utf-8" to text/* media types itself; prometheus_client's constant has one too.
METRICS_MEDIA_TYPE = CONTENT_TYPE_LATEST.split("; charset=")[0]


class OpsController(Controller):
    path = "/"
    tags = ["ops"]

    @get("/health")
    async def health(self, serving: NamedDependency[ServingContext]) -> Response[bytes]:
        if not serving.client.is_healthy():
            raise EngineDeadError(f"the engine is not running: {serving.client.dead_error or 'stopped'}")
        return Response(b"", media_type=MediaType.TEXT)

    @get("/version")
    async def version(self) -> VersionResponse:
        return VersionResponse(version=package_version())

    @get("/metrics")
    async def metrics(self, serving: NamedDependency[ServingContext]) -> Response[bytes]:
        serving.metrics.set_engine_stats(serving.client.stats)
        return Response(serving.metrics.render(), media_type=METRICS_MEDIA_TYPE)

    @get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> dict:
        return request.app.openapi_schema.to_schema()
