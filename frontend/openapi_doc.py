"""The frontend's OpenAPI document (`/openapi.json`, rendered at `/docs`).

The serving routes are plain Starlette routes that parse their own bodies (FastAPI's
dependency solving would cost CPU on every request), so FastAPI cannot see their models. The
document is built from documentation-only declarations of the same endpoints, with the
request and response models of `frontend.openai_schemas` (OpenAI's field names); they are
never served.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from frontend.openai_schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
)
from frontend.responses_api import (
    InputItemList,
    ResponseDeleted,
    ResponseObject,
    ResponsesRequest,
)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, 4xx and 5xx, in OpenAI's shape."""

    error: ErrorDetail


class Status(BaseModel):
    status: str
    workers: int | None = None
    in_flight: dict[str, int] | None = None  # requests each worker serves now (/health)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


def _stream_of(model: type[BaseModel]) -> dict[str, Any]:
    """A streamed answer: text, whose events' JSON is `model` (`x-sse-data`: OpenAPI 3.1
    cannot type an event stream's items; the model is in the components all the same)."""
    return {"text/event-stream": {"schema": {
        "description": f"with `stream: true`: server-sent events, each `data: <{model.__name__}>`"
                       " (with `n` > 1, or a batch of prompts, the choices' chunks interleave, "
                       "each naming its choice's `index`), then `data: [DONE]` once every "
                       "choice has finished",
        "type": "string",
        "x-sse-data": {"$ref": f"{_COMPONENTS}{model.__name__}"},
    }}}  # fmt: skip


_COMPONENTS = "#/components/schemas/"
_STREAMED = (ChatCompletionChunk,)  # event models no route's response_model names


def _add_components(schema: dict[str, Any], models: tuple[type[BaseModel], ...]) -> None:
    """Put `models` (and the models they use) among the document's schemas."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        found = model.model_json_schema(
            ref_template=_COMPONENTS + "{model}", mode="serialization"
        )
        for name, sub in found.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components.setdefault(model.__name__, found)


def openapi_schema(title: str, version: str, bearer: bool = False) -> dict[str, Any]:
    """The document; `bearer`: the /v1 operations need an API key (`/docs` then offers to
    send one)."""
    docs = APIRouter()

    @docs.post(
        "/v1/chat/completions", response_model=ChatCompletionResponse,
        summary="Chat completion (OpenAI)",
        responses={200: {"content": _stream_of(ChatCompletionChunk)},
                   **_errors(400, 404, 413, 500, 502, 503, 504)},
    )  # fmt: skip
    def chat_completions(body: ChatCompletionRequest) -> None:
        """Messages in, the assistant's answer out; `stream: true` streams chunks."""

    @docs.post(
        "/v1/completions", response_model=CompletionResponse, summary="Text completion (OpenAI)",
        responses={200: {"content": _stream_of(CompletionResponse)},
                   **_errors(400, 404, 413, 500, 502, 503, 504)},
    )  # fmt: skip
    def completions(body: CompletionRequest) -> None:
        """A prompt (text or token ids), or a batch of them, in; the continuations out."""

    @docs.post(
        "/v1/responses", response_model=ResponseObject, summary="Response (OpenAI Responses API)",
        responses={200: {"content": {"text/event-stream": {"schema": {
            "description": "with `stream: true`: typed server-sent events (`event: <type>` "
                           "and `data: {type, sequence_number, ...}`): response.created, "
                           "response.in_progress, response.output_item.added, "
                           "response.content_part.added, response.output_text.delta / .done, "
                           "response.content_part.done, response.function_call_arguments"
                           ".delta / .done, response.output_item.done, then "
                           "response.completed or response.incomplete (response.failed "
                           "when a worker fails after the start); with `background: true` "
                           "too, the same events from the run, which goes on if the client "
                           "leaves",
            "type": "string"}}}},
                   **_errors(400, 404, 413, 429, 500, 502, 503, 504)},
    )  # fmt: skip
    def responses(body: ResponsesRequest) -> None:
        """Input items in, output items out, through the chat path (same template,
        routing, tool calling, constrained output); `store` keeps it for
        `previous_response_id` and GET. `background: true`: answered at once (status
        queued), generated by the frontend process that took it (429 past
        frontend.max_background_responses)."""

    @docs.get(
        "/v1/responses/{response_id}", response_model=ResponseObject,
        responses={200: {"content": {"text/event-stream": {"schema": {
            "description": "with `stream=true` (a response made with background and stream "
                           "true): its events after `starting_after`, live until it ends",
            "type": "string"}}}}, **_errors(400, 404, 503)},
        summary="A stored response",
    )  # fmt: skip
    def responses_retrieve(
        response_id: str, stream: bool = False, starting_after: int | None = None
    ) -> None:
        """A response made with `store: true`, until frontend.responses_store_ttl_s; a
        background one's status now (queued, in_progress, then completed, incomplete,
        failed: also when the frontend process running it died, or cancelled)."""

    @docs.post("/v1/responses/{response_id}/cancel", response_model=ResponseObject,
               responses=_errors(400, 404, 503),
               summary="Cancel a background response")  # fmt: skip
    def responses_cancel(response_id: str) -> None:
        """Stop a background response's generation (from any frontend process): status
        cancelled, with the output so far; one that ended comes back unchanged; a response
        made without `background` is a 400."""

    @docs.delete("/v1/responses/{response_id}", response_model=ResponseDeleted,
                 responses=_errors(404, 503), summary="Delete a stored response")  # fmt: skip
    def responses_delete(response_id: str) -> None:
        """Forget a stored response (a later previous_response_id naming it is a 404)."""

    @docs.get("/v1/responses/{response_id}/input_items", response_model=InputItemList,
              responses=_errors(400, 404, 503), summary="Its input items")  # fmt: skip
    def responses_input_items(
        response_id: str, order: str = "desc", limit: int = 20, after: str | None = None
    ) -> None:
        """The conversation that led to the response (earlier responses' too)."""

    @docs.post(
        "/v1/embeddings", response_model=EmbeddingResponse, summary="Embeddings (OpenAI)",
        responses=_errors(400, 404, 413, 500, 502, 503, 504),
    )  # fmt: skip
    def embeddings(body: EmbeddingRequest) -> None:
        """A text or token ids, or a batch of them, in; one vector each out (the pooled
        final hidden states: model.pooler). Served by a deployment with `model.task: embed`;
        another deployment answers 400 naming `model`."""

    @docs.get("/v1/models", response_model=ModelList, summary="The served model")
    def models() -> None:
        """The one model this deployment serves, with its context length."""

    @docs.get("/v1/models/{model}", response_model=ModelCard, responses=_errors(404),
              summary="One model (OpenAI)")  # fmt: skip
    def model(model: str) -> None:
        """The served model's card, as `/v1/models` lists it; another id is a 404
        (`model_not_found`)."""

    @docs.get("/health", response_model=Status, responses=_errors(503), summary="Readiness")
    def health() -> None:
        """200 while at least one worker can serve; 503 before that."""

    @docs.get("/live", response_model=Status, summary="Liveness")
    def live() -> None:
        """200 while the frontend process runs."""

    @docs.get("/metrics", summary="Prometheus metrics",
              responses={200: {"content": {"text/plain": {}}}})  # fmt: skip
    def metrics() -> None:
        """Request counts and latencies, migrations, restarts, the KV index size."""

    schema = get_openapi(title=title, version=version, routes=docs.routes)
    for path in schema["paths"].values():  # bad input is a 400 in OpenAI's shape, not a 422
        for operation in path.values():
            operation["responses"].pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    _add_components(schema, _STREAMED)
    if bearer:
        schema["components"]["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "frontend.api_key_file"}
        }
        for path, operations in schema["paths"].items():
            if path.startswith("/v1"):
                for operation in operations.values():
                    operation["security"] = [{"apiKey": []}]
                    operation["responses"]["401"] = {
                        "description": "a missing or wrong API key",
                        "content": {"application/json": {"schema": {
                            "$ref": f"{_COMPONENTS}ErrorResponse"}}},
                    }  # fmt: skip
    return schema
