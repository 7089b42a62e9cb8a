"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Every problem with the input is a 4xx naming the field; the frontend never answers 500 for
something the client sent. Server-side trouble (no worker, worker lost) is a 5xx that says so.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from contract.discovery import WorkerCard
from contract.messages import GenerateOutput

logger = logging.getLogger(__name__)

# pydantic puts union-branch and validator tags into `loc`; they are not field names
_LOC_NOISE = frozenset(
    {
        "str",
        "int",
        "float",
        "bool",
        "list",
        "dict",
        "none",
        "function-after",
        "function-before",
        "function-plain",
        "function-wrap",
        "body",
    }
)


class OpenAIError(Exception):
    """An error the client should see as an OpenAI error body with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        return Response(
            orjson.dumps(self.body()), status_code=self.status, media_type="application/json"
        )


def unauthorized(sent: bool) -> Response:
    """401 as OpenAI answers a missing or wrong API key (`frontend.api_key_file`)."""
    message = (
        "Incorrect API key provided."
        if sent
        else "You didn't provide an API key: send it as `Authorization: Bearer <key>` "
        "(the openai client's api_key)."
    )
    response = OpenAIError(401, message, code="invalid_api_key").response()
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{model}` does not exist.",
        param="model",
        code="model_not_found",
    )


def context_length_exceeded(message: str, param: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="context_length_exceeded")


def request_too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413, f"the request body is larger than {limit} bytes (frontend.max_request_bytes)",
        code="request_too_large",
    )  # fmt: skip


def no_worker(message: str) -> OpenAIError:
    return OpenAIError(503, message, type="service_unavailable", code="no_worker_available")


def worker_failed(message: str) -> OpenAIError:
    return OpenAIError(502, message, type="server_error", code="worker_failed")


def timed_out(seconds: float) -> OpenAIError:
    return OpenAIError(
        504,
        f"the request did not finish within {seconds:g} s",
        type="server_error",
        code="timeout",
    )


def loc_to_param(loc: tuple[int | str, ...]) -> str | None:
    """('messages', 0, 'role') → 'messages.0.role', dropping pydantic's branch tags (and
    a discriminated union's tag: ('content', 1, 'image_url', 'image_url', 'url') is
    'content.1.image_url.url')."""
    kept = [
        part
        for part in loc
        if isinstance(part, int) or (part not in _LOC_NOISE and "[" not in part)
    ]
    parts = [
        str(part)
        for index, part in enumerate(kept)
        if not (
            isinstance(part, str)
            and 0 < index < len(kept) - 1
            and isinstance(kept[index - 1], int)
            and kept[index + 1] == part
        )
    ]
    return ".".join(parts) or None


def from_validation_errors(errors: list[dict[str, Any]]) -> OpenAIError:
    """The first pydantic error as a 400; its location becomes `param`."""
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    param = loc_to_param(tuple(first.get("loc", ())))
    # a union reports one error per branch; the deepest one under the same field says most
    for other in errors[1:]:
        other_param = loc_to_param(tuple(other.get("loc", ())))
        if param and other_param and other_param.startswith(param + "."):
            first, param = other, other_param
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    head, sep, rest = message.partition(": ")
    if param is None and sep and " " not in head:  # "field: reason" from a model validator
        param, message = head, rest
    if first.get("type") == "missing":
        message = "field required"
    if first.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        # a discriminated union (content parts): name the tag field and what it may be
        ctx = first.get("ctx") or {}
        field = str(ctx.get("discriminator", "type")).strip("'\"")
        param = f"{param}.{field}" if param else field
        tag = ctx.get("tag")
        expected = ctx.get("expected_tags", "")
        message = (
            f"{tag!r} is not supported; expected one of {expected}"
            if tag is not None
            else f"field required; expected one of {expected}"
            if expected
            else "field required"
        )
    return bad_request(f"{param}: {message}" if param else message, param=param)


def parse_json_body(raw: bytes) -> Any:
    """orjson decode; malformed JSON or a non-object body is a 400."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return data


def error_response(exc: Exception) -> Response:
    """The OpenAI error response for an exception leaving a request handler (the one
    mapping both FastAPI's exception handlers and the app's direct generation routes use)."""
    if isinstance(exc, OpenAIError):
        return exc.response()
    if isinstance(exc, ValidationError):
        return from_validation_errors(exc.errors()).response()  # type: ignore[arg-type]
    if isinstance(exc, RequestValidationError):
        return from_validation_errors(list(exc.errors())).response()
    if isinstance(exc, StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return OpenAIError(exc.status_code, str(exc.detail), type=kind).response()
    logger.error("unexpected error: %s", exc, exc_info=exc)
    return OpenAIError(500, f"internal error: {exc}", type="server_error").response()


def install_handlers(app: FastAPI) -> None:
    """Make every error leaving the app an OpenAI error body."""

    async def handler(_: Request, exc: Exception) -> Response:
        return error_response(exc)

    for kind in (OpenAIError, ValidationError, RequestValidationError, StarletteHTTPException,
                 Exception):  # fmt: skip
        app.add_exception_handler(kind, handler)


def raise_for_worker_error(output: GenerateOutput, card: WorkerCard) -> None:
    """The HTTP error a worker's failing chunk stands for (none for a good chunk)."""
    if output.finish_reason == "error":
        message = output.error or "the worker failed the request"
        if output.error_param:
            raise bad_request(message, param=output.error_param)
        raise OpenAIError(500, f"worker {card.worker_id}: {message}", type="server_error")
    if output.finish_reason == "abort":
        raise no_worker(f"worker {card.worker_id} aborted the request")
