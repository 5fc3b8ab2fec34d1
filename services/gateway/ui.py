"""The learner page at ``/ui/``: a stand-in for a real learning frontend, for ``make run``.

Pick a template, follow the progress from the event stream, then a terminal tab per VM
(xterm.js and its attach addon, served as npm installed them, no bundler). While the page is
open it sends heartbeats; when it closes, a ``sendBeacon`` close, and the connections it held
going away tells the gateway too.

A real frontend creates sessions server to server with its frontend token. This page has no
server of its own, so in dev mode only the gateway offers ``POST /ui/dev/sessions``, which
creates the session with the configured frontend token and hands the page its session token:
nothing to paste, nothing in a URL. In production that route does not exist.

``/ui/ops``, the operators' dashboard, is the API's: the ingress routes it there, and here no
route of the learner page matches it, so ``labvirt dev``'s proxy hands it to the API.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Final

import aiohttp
import structlog
from aiohttp import web

from shared.config import Mode, Settings
from shared.problems import PROBLEM_MEDIA_TYPE, problem_body

log = structlog.get_logger(__name__)

PAGE_DIR: Final = Path(__file__).resolve().parent / "ui"
VENDOR: Final = {
    "xterm.js": "@xterm/xterm/lib/xterm.js",
    "xterm.css": "@xterm/xterm/css/xterm.css",
    "addon-attach.js": "@xterm/addon-attach/lib/addon-attach.js",
    "addon-fit.js": "@xterm/addon-fit/lib/addon-fit.js",
}
USER_COOKIE: Final = "labvirt_dev_user"


def add_ui_routes(app: web.Application, settings: Settings) -> None:
    async def index(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def vendor(request: web.Request) -> web.FileResponse:
        relative = VENDOR.get(request.match_info["name"])
        if relative is None:
            raise web.HTTPNotFound()
        path = settings.node_modules / relative
        if not path.is_file():
            log.error("ui.vendor_missing", path=str(path), hint="run `make install` (npm ci)")
            raise web.HTTPNotFound(text=f"{relative} is not installed: run `make install`")
        return web.FileResponse(path)

    async def to_index(_request: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/")

    app.router.add_get("/ui", to_index)
    app.router.add_get("/ui/", index)
    app.router.add_static("/ui/static/", PAGE_DIR, show_index=False)
    app.router.add_get("/ui/vendor/{name}", vendor)
    if settings.mode is Mode.DEV and settings.gateway_api_url and settings.frontend_tokens:
        add_dev_session_route(app, settings)


def add_dev_session_route(app: web.Application, settings: Settings) -> None:
    token = sorted(settings.frontend_tokens)[0]
    api = (settings.gateway_api_url or "").rstrip("/")

    async def create(request: web.Request) -> web.Response:
        try:
            body: Any = await request.json()
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's stack
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("template"), str):
            return web.json_response(
                problem_body(
                    400,
                    "invalid_request",
                    'send {"template": NAME}',
                    errors=[{"pointer": "/template", "detail": "a template name is required"}],
                ),
                status=400,
                content_type=PROBLEM_MEDIA_TYPE,
            )
        user = request.cookies.get(USER_COOKIE) or f"learner-{secrets.token_hex(4)}"
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{api}/v1/sessions",
                json={"template": body["template"], "user": user, "replace": True},
                headers={"Authorization": f"Bearer {token}"},
            ) as answer,
        ):
            payload = await answer.json()
        # The API's own media type: a problem stays application/problem+json.
        response = web.json_response(
            payload, status=answer.status, content_type=answer.content_type
        )
        response.set_cookie(USER_COOKIE, user, httponly=True, samesite="Strict", path="/ui")
        return response

    async def templates(_request: web.Request) -> web.Response:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{api}/v1/templates", headers={"Authorization": f"Bearer {token}"}) as answer,
        ):
            return web.json_response(
                await answer.json(), status=answer.status, content_type=answer.content_type
            )

    app.router.add_post("/ui/dev/sessions", create)
    app.router.add_get("/ui/dev/templates", templates)
