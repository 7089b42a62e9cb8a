"""`FrontendApp`: the generation routes it dispatches itself answer errors as FastAPI's
exception handlers would (the OpenAI error shape); every other request goes through FastAPI."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response

from frontend import errors
from frontend.app import FrontendApp
from frontend.openai_schemas import ChatCompletionRequest

ROUTED: list[bool] = []  # per call: whether Starlette's router (FastAPI's stack) ran


async def _raises(request: Request) -> Response:
    ROUTED.append("route" in request.scope)
    body = await request.json()
    if body["what"] == "openai":
        raise errors.bad_request("n: too many", param="n")
    if body["what"] == "validation":
        ChatCompletionRequest.model_validate({"messages": "not a list"})
    raise RuntimeError("boom")


def _app() -> FrontendApp:
    app = FrontendApp()
    errors.install_handlers(app)
    app.router.add_route("/v1/x", _raises, methods=["POST"])
    app.direct = {"/v1/x": _raises}
    return app


async def _call(app: FrontendApp, method: str, what: str = "") -> tuple[int, Any]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.request(method, "/v1/x", json={"what": what})
    return response.status_code, response.json()


async def test_direct_routes_answer_errors_in_the_openai_shape() -> None:
    ROUTED.clear()
    app = _app()
    status, body = await _call(app, "POST", "openai")
    assert status == 400 and body["error"]["param"] == "n"
    status, body = await _call(app, "POST", "validation")
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = await _call(app, "POST", "other")
    assert status == 500 and body["error"]["type"] == "server_error"
    assert "boom" in body["error"]["message"]
    assert ROUTED == [False, False, False]  # FastAPI's stack was skipped


async def test_other_methods_go_through_fastapi() -> None:
    status, body = await _call(_app(), "GET")
    assert status == 405 and body["error"]["type"] == "invalid_request_error"
