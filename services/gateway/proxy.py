"""One origin for a laptop: the gateway hands every path it does not serve to the API.

Used by ``labvirt dev`` (``LABVIRT_GATEWAY_API_URL``), where the learner page, the API, the
event streams and the terminals share one address, as an ingress gives them in production.
That includes the operators' dashboard at ``/ui/ops``: the API's, not the learner page's
(``services.gateway.ui`` leaves it to this proxy).
Hop-by-hop headers are dropped; the client's address goes on in ``X-Forwarded-For``.
"""

from __future__ import annotations

from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from shared.problems import PROBLEM_MEDIA_TYPE, problem_body

_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
MAX_BODY_BYTES: Final = 64 * 1024


class ApiProxy:
    def __init__(self, api_url: str) -> None:
        self._api_url = api_url.rstrip("/")
        self._http: aiohttp.ClientSession | None = None

    def install(self, app: web.Application) -> None:
        async def start(_app: web.Application) -> None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30), auto_decompress=False
            )

        async def stop(_app: web.Application) -> None:
            if self._http is not None:
                await self._http.close()

        app.on_startup.append(start)
        app.on_cleanup.append(stop)
        app.router.add_route("*", "/{tail:.*}", self.forward)

    async def forward(self, request: web.Request) -> web.Response:
        assert self._http is not None
        body = await request.content.read(MAX_BODY_BYTES + 1)
        if len(body) > MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=len(body))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        peer = request.remote or ""
        forwarded = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{forwarded}, {peer}" if forwarded else peer
        try:
            async with self._http.request(
                request.method,
                self._api_url + request.rel_url.path_qs,
                headers=headers,
                data=body or None,
                allow_redirects=False,
            ) as upstream:
                payload = await upstream.read()
                # A multidict: an answer may set several cookies (the operators' dashboard).
                answer = CIMultiDict(
                    (k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP
                )
                return web.Response(status=upstream.status, body=payload, headers=answer)
        except aiohttp.ClientError as exc:
            return web.json_response(
                problem_body(502, "api_unavailable", f"the API did not answer: {exc}"),
                status=502,
                content_type=PROBLEM_MEDIA_TYPE,
            )
