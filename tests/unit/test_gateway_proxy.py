"""`labvirt dev`'s one origin: the gateway serves the learner page at /ui/ and hands every
other path to the API, the operators' dashboard at /ui/ops included, cookies and all."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from services.gateway.proxy import ApiProxy
from services.gateway.ui import add_ui_routes
from shared.config import Mode, Settings


async def fake_api(request: web.Request) -> web.Response:
    """The API's stand-in: says which path and body reached it, and sets two cookies."""
    body = await request.text()
    response = web.json_response({"path": request.path_qs, "body": body, "method": request.method})
    response.headers.add("Set-Cookie", "labvirt_ops=one; Path=/ui/ops; HttpOnly")
    response.headers.add("Set-Cookie", "other=two; Path=/ui/ops")
    return response


def through_the_gateway(*calls: tuple[str, str, dict[str, Any]]) -> list[dict[str, Any]]:
    async def main() -> list[dict[str, Any]]:
        upstream = web.Application()
        upstream.router.add_route("*", "/{tail:.*}", fake_api)
        async with TestServer(upstream) as api:
            gateway = web.Application()
            # As ``services.gateway.app.create_app`` wires them: the page's routes, then the proxy.
            add_ui_routes(gateway, Settings(mode=Mode.DEV))
            ApiProxy(str(api.make_url("/"))).install(gateway)
            async with TestClient(TestServer(gateway)) as http:
                answers = []
                for method, path, options in calls:
                    async with http.request(method, path, allow_redirects=False, **options) as r:
                        answers.append(
                            {
                                "status": r.status,
                                "cookies": r.headers.getall("Set-Cookie", []),
                                "type": r.content_type,
                                "body": await r.text(),
                            }
                        )
                return answers

    return asyncio.run(main())


def test_the_dashboard_reaches_the_api_and_the_learner_page_stays_the_gateways() -> None:
    dashboard, static, sign_in, learner = through_the_gateway(
        ("GET", "/ui/ops", {}),
        ("GET", "/ui/ops/static/ops.css", {}),
        ("POST", "/ui/ops/sign-in", {"data": {"token": "t", "operator": "ann"}}),
        ("GET", "/ui/", {}),
    )

    assert dashboard["status"] == 200
    assert '"path": "/ui/ops"' in dashboard["body"]
    assert dashboard["cookies"] == [  # both, not the last one alone
        "labvirt_ops=one; Path=/ui/ops; HttpOnly",
        "other=two; Path=/ui/ops",
    ]
    assert '"path": "/ui/ops/static/ops.css"' in static["body"]
    assert '"method": "POST"' in sign_in["body"]
    assert "token=t&operator=ann" in sign_in["body"]
    assert learner["status"] == 200
    assert learner["type"] == "text/html"
    assert learner["cookies"] == []
