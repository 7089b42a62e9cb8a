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
    return {"text/event-stream": {"schema": {
        "description": f"with `stream: true`: server-sent events, each `data: <{model.__name__}>`"
                       " (with `n` > 1, or a batch of prompts, the choices' chunks interleave, "
                       "each naming its choice's `index`), then `data: [DONE]` once every "
                       "choice has finished",
        "type": "string",
    }}}  # fmt: skip


def openapi_schema(title: str, version: str) -> dict[str, Any]:
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
    return schema
