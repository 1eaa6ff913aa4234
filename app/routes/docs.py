"""/docs: Swagger UI served by the server itself, so it renders offline. The JS/CSS come from the
swagger-ui-bundle package (a packaged copy of swagger-ui-dist) under /docs/assets; the page's HTML
references only this server's paths (Litestar's default points at a CDN).

Caller: app.server.create_app (the OpenAPI render plugin and the assets router).
"""

from __future__ import annotations

from pathlib import Path

from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.router import Router
from litestar.static_files import create_static_files_router
from swagger_ui_bundle import swagger_ui_path

ASSETS_PATH = "/docs/assets"


def swagger_render_plugin() -> SwaggerRenderPlugin:
    return SwaggerRenderPlugin(
        js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js", css_url=f"{ASSETS_PATH}/swagger-ui.css",
        standalone_preset_js_url=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
        favicon=f"<link rel='icon' type='image/png' href='{ASSETS_PATH}/favicon-32x32.png'>")


def swagger_assets_router() -> Router:
    return create_static_files_router(path=ASSETS_PATH, directories=[Path(str(swagger_ui_path))],
                                      include_in_schema=False)
