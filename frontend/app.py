"""The FastAPI app: OpenAI endpoints over the request path (`frontend.serving`).

Routes are thin: each endpoint hands its request to `serving.handle` (generation;
/v1/responses: `responses_serving`, over the same path), to `embeddings.handle_embeddings`
(/v1/embeddings), or answers from the shared state (`frontend.state`: health, models,
metrics). Response building lives in `frontend.responses`, the request as known before
routing in `frontend.prepared`.

The generation routes and /v1/embeddings are the hot path: `FrontendApp` dispatches them
itself, before FastAPI's middleware stack (server-error, exception, exit-stack, body-limit
and telemetry layers: a good part of the frontend's CPU per request, and nothing these
endpoints use), with the same error mapping (`errors.error_response`). Every other path goes
through FastAPI.
"""

from __future__ import annotations

import functools
import hmac
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from contract.api_keys import load_api_keys
from contract.config import DeploymentConfig
from frontend import errors, responses_serving
from frontend.background import BackgroundResponses
from frontend.embeddings import handle_embeddings
from frontend.errors import OpenAIError
from frontend.openapi_doc import openapi_schema
from frontend.responses import AnsweredResponse, ClientGone, SSEResponse, json_response
from frontend.serving import handle
from frontend.state import FrontendState, check_config

logger = logging.getLogger(__name__)

PROCESS_HEADER = "X-Hpcserve-Frontend"  # which frontend process served (frontend.workers > 1)

try:
    VERSION = importlib.metadata.version("hpcserve")
except importlib.metadata.PackageNotFoundError:  # a source tree that was not installed
    VERSION = "0"


Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[FrontendState, Request], Awaitable[Response]]


class FrontendApp(FastAPI):
    """FastAPI, except that POSTs to the generation routes (`direct`) skip its middleware
    stack: the endpoint is called with a plain Starlette `Request`, an exception it raises
    becomes the same OpenAI error body the exception handlers would make. With API keys
    (`contract.api_keys`), every /v1 request is checked first, whatever its route."""

    def __init__(self, api_keys: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.direct: dict[str, Endpoint] = {}
        self.api_keys = tuple(key.encode() for key in api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_keys and scope["type"] == "http" and scope["path"].startswith("/v1"):
            sent = _bearer_token(scope["headers"])
            if sent is None or not self._accepts(sent):
                await errors.unauthorized(sent is not None)(scope, receive, send)
                return
        if scope["type"] == "http" and scope["method"] == "POST" and not self.root_path:
            endpoint = self.direct.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                request = Request(scope, receive, send)
                try:
                    response = await endpoint(request)
                except Exception as exc:
                    response = errors.error_response(exc)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _accepts(self, token: bytes) -> bool:
        """Whether `token` is a key, compared in constant time against every key."""
        found = False
        for key in self.api_keys:
            found |= hmac.compare_digest(token, key)
        return found


def _bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of a request's `Authorization: Bearer <token>` header (None: none sent)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return None


def create_app(config: DeploymentConfig) -> FastAPI:
    """The frontend app for `config`; NATS, etcd and the tokenizer are opened in its lifespan."""
    check_config(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = FrontendState(config)
        await state.start()
        state.background = BackgroundResponses(
            state.response_store, config.services.etcd.endpoint or "", config.name,
            state.frontend_id, config.frontend.background_owner_ttl_s,
            config.frontend.max_background_responses, state.metrics,
        )  # fmt: skip
        await state.background.start(state.client.nats)
        app.state.frontend = state
        logger.info(
            "serving %s for deployment %s (router %s)",
            state.served_name,
            config.name,
            config.frontend.router,
        )
        try:
            yield
        finally:
            await state.background.stop()  # its runs' ends written before etcd goes
            await state.stop()

    api_keys = load_api_keys(config.frontend.api_key_file)
    app = FrontendApp(
        api_keys, title="hpcserve", version=VERSION, lifespan=lifespan, redoc_url=None
    )
    schema = openapi_schema("hpcserve", VERSION, bearer=bool(api_keys))
    app.openapi = lambda: schema  # type: ignore[method-assign]
    errors.install_handlers(app)

    def state_of(request: Request) -> FrontendState:
        return request.app.state.frontend  # type: ignore[no-any-return]

    async def live(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def health(request: Request) -> Response:
        state = state_of(request)
        workers = state.candidates(set())
        if not workers:
            return json_response({"status": "no workers", "workers": 0}, status=503)
        body: dict[str, object] = {
            "status": "ok",
            "workers": len(workers),
            "in_flight": {  # the load it routes by: which workers serve requests now
                card.worker_id: state.tracker.requests_on(card.worker_id) for card in workers
            },
        }
        if state.process_count > 1:  # which process answered, and what it knows
            body["process"] = state.process_index
            if state.kv_feed is not None:
                body["kv_index_blocks"] = state.kv_feed.index.num_held()
        return json_response(body)

    async def metrics(request: Request) -> Response:
        state = state_of(request)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    def model_card(state: FrontendState) -> dict[str, object]:
        """The served model's card, as /v1/models lists it and /v1/models/{model} gives it."""
        workers = state.candidates(set())
        max_len = min((card.max_model_len for card in workers), default=None)
        return {
            "id": state.served_name,
            "object": "model",
            "created": state.started,
            "owned_by": "hpcserve",
            "max_model_len": max_len or state.tokenizer.max_model_len,
        }

    async def models(request: Request) -> Response:
        return json_response({"object": "list", "data": [model_card(state_of(request))]})

    async def model(request: Request) -> Response:
        state = state_of(request)
        name = request.path_params["model"]
        if name != state.served_name:
            raise errors.model_not_found(name)
        return json_response(model_card(state))

    serve_chat = functools.partial(handle, kind="chat")
    serve_completion = functools.partial(handle, kind="completion")

    async def chat_completions(request: Request) -> Response:
        return await _serve(request, "chat", serve_chat)

    async def completions(request: Request) -> Response:
        return await _serve(request, "completions", serve_completion)

    async def embeddings(request: Request) -> Response:
        return await _serve(request, "embeddings", handle_embeddings)

    async def responses_create(request: Request) -> Response:
        return await _serve(request, "responses", responses_serving.create)

    async def responses_retrieve(request: Request) -> Response:
        return await responses_serving.retrieve(state_of(request), request)

    async def responses_delete(request: Request) -> Response:
        return await responses_serving.delete(state_of(request), request)

    async def responses_input_items(request: Request) -> Response:
        return await responses_serving.input_items(state_of(request), request)

    async def responses_cancel(request: Request) -> Response:
        return await responses_serving.cancel(state_of(request), request)

    # plain Starlette routes: FastAPI's dependency solving costs CPU on every request and
    # these endpoints parse their own bodies; exception handlers still apply
    app.router.add_route("/live", live, methods=["GET"])
    app.router.add_route("/health", health, methods=["GET"])
    app.router.add_route("/metrics", metrics, methods=["GET"])
    app.router.add_route("/v1/models", models, methods=["GET"])
    # `path`: a served name may hold slashes (org/model), as the openai client sends it
    app.router.add_route("/v1/models/{model:path}", model, methods=["GET"])
    app.router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.router.add_route("/v1/completions", completions, methods=["POST"])
    app.router.add_route("/v1/embeddings", embeddings, methods=["POST"])
    app.router.add_route("/v1/responses", responses_create, methods=["POST"])
    app.router.add_route("/v1/responses/{response_id}", responses_retrieve, methods=["GET"])
    app.router.add_route("/v1/responses/{response_id}", responses_delete, methods=["DELETE"])
    app.router.add_route(
        "/v1/responses/{response_id}/input_items", responses_input_items, methods=["GET"]
    )
    app.router.add_route("/v1/responses/{response_id}/cancel", responses_cancel, methods=["POST"])
    app.direct = {
        "/v1/chat/completions": chat_completions,
        "/v1/completions": completions,
        "/v1/responses": responses_create,
        "/v1/embeddings": embeddings,
    }

    async def _serve(request: Request, endpoint: str, serve: Handler) -> Response:
        """Serve a generation request with `serve`, counted in the metrics as `endpoint`."""
        state = state_of(request)
        metrics = state.metrics
        metrics.in_flight.inc()
        status = "500"
        streaming = counted = False
        try:
            response = await serve(state, request)
            status = str(response.status_code)
            if state.process_count > 1:
                response.headers[PROCESS_HEADER] = str(state.process_index)
            if isinstance(response, SSEResponse):
                streaming = True
                response.on_close.append(metrics.in_flight.dec)
            elif isinstance(response, AnsweredResponse):  # counted once sent, as its release
                counted = True
                response.after.append(functools.partial(metrics.count_answered, endpoint, status))
            return response
        except OpenAIError as exc:
            status = str(exc.status)
            raise
        except ClientGone:
            status = "499"
            return Response(status_code=499)
        except ValidationError:
            status = "400"
            raise
        finally:
            if not counted:
                metrics.count_request(endpoint, status)
                if not streaming:
                    metrics.in_flight.dec()

    return app
