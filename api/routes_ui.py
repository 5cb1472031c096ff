"""Browser pages served by textgen itself, so they work with no internet access: Swagger UI at
/docs (assets from the `swagger-ui-bundle` package, no CDN) and the live /dashboard (a page and a
script of this package that poll /metrics: the dashboard keeps no numbers of its own)."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import FileResponse, HTMLResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
DOCS_ASSETS = "/docs/assets"


def add_ui_routes(app: FastAPI, openapi_url: str) -> None:
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")
    app.mount("/dashboard/assets", StaticFiles(directory=STATIC), name="dashboard-assets")

    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")

    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "dashboard.html", media_type="text/html")

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
    app.add_api_route("/dashboard", dashboard, methods=["GET"], include_in_schema=False)
