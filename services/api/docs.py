"""The public contract: ``GET /openapi.json`` and ``GET /docs``, a page that renders it.

Neither needs a token: the document says nothing a client could not learn by calling. The
page is swagger-ui-dist as npm installed it (``make install``), served from node_modules,
no copy and no bundler.
"""

from __future__ import annotations

from typing import Any, Final

import structlog
from flask import Blueprint, Response, current_app, jsonify, send_file

from services.api.context import runtime
from services.api.errors import ApiError
from services.api.openapi import RawContent, documented, openapi_document

log = structlog.get_logger(__name__)

docs = Blueprint("docs", __name__)

DOCUMENT_KEY: Final = "labvirt.openapi"
ASSETS: Final = {
    "swagger-ui.css": ("swagger-ui-dist/swagger-ui.css", "text/css"),
    "swagger-ui-bundle.js": ("swagger-ui-dist/swagger-ui-bundle.js", "text/javascript"),
}
PAGE: Final = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>labvirt API</title>
  <link rel="stylesheet" href="/docs/vendor/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/vendor/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});
  </script>
</body>
</html>
"""
_TEXT: Final = {"type": "string"}


@docs.get("/openapi.json")
@documented(
    summary="This document: the API's contract",
    answers={200: RawContent({"application/json": {"type": "object"}})},
    uses_storage=False,
)
def openapi_json() -> Response:
    document: dict[str, Any] | None = current_app.extensions.get(DOCUMENT_KEY)
    if document is None:
        # Built once per process: the routes and schemas do not change while it runs.
        document = current_app.extensions[DOCUMENT_KEY] = openapi_document(current_app)
    return jsonify(document)


@docs.get("/docs")
@documented(
    summary="The document, rendered for a browser (Swagger UI)",
    answers={200: RawContent({"text/html": _TEXT})},
    uses_storage=False,
)
def docs_page() -> Response:
    return Response(PAGE, mimetype="text/html")


@docs.get("/docs/vendor/<asset>")
@documented(
    summary="The docs page's scripts and styles, as npm installed them",
    answers={200: RawContent({media: _TEXT for _, media in ASSETS.values()})},
    errors={404: "No such asset, or not installed (`make install` runs `npm ci`)."},
    path_parameters={"asset": {"type": "string", "enum": sorted(ASSETS)}},
    uses_storage=False,
)
def docs_asset(asset: str) -> Response:
    relative, media = ASSETS.get(asset, ("", ""))
    path = runtime().settings.node_modules / relative
    if not relative or not path.is_file():
        if relative:
            log.error("docs.asset_missing", path=str(path), hint="run `make install` (npm ci)")
        raise ApiError(404, "not_found", f"{asset} is not installed here")
    return send_file(path, mimetype=media, max_age=3600)
