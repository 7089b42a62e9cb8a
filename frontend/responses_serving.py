"""The endpoints of OpenAI's Responses API: `POST /v1/responses` (through the chat path:
`frontend.responses_api` translates the request, `frontend.serving.serve` serves it,
`frontend.response_objects` writes the answer), and the stored responses' `GET`,
`DELETE` and `GET .../input_items` (`frontend.response_store`).

Every error names the Responses field: the chat path's errors are mapped back
(`Translation.error`)."""

from __future__ import annotations

import time
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from frontend import errors
from frontend.errors import OpenAIError
from frontend.response_objects import ResponsesAnswer
from frontend.response_store import with_ids
from frontend.responses import json_response
from frontend.responses_api import (
    MessageItem,
    ResponsesRequest,
    parse_items,
    parse_request,
    translate,
)
from frontend.serving import read_json_body, serve
from frontend.state import FrontendState


async def create(state: FrontendState, request: Request) -> Response:
    """POST /v1/responses."""
    arrival = time.perf_counter()
    body = parse_request(await read_json_body(state, request))
    asked = body.reasoning.asked() if body.reasoning is not None else None
    if asked is not None and state.reasoning_format is None:
        raise errors.bad_request(
            f"reasoning.{asked}: is not supported with this model (it does not reason: "
            "frontend.reasoning_parser is not set), as OpenAI answers for its models that "
            "do not reason",
            param=f"reasoning.{asked}",
        )
    earlier: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        record = await state.response_store.get(body.previous_response_id, "previous_response_id")
        earlier = [*record["input"], *record["response"]["output"]]
    translation = translate(body, parse_items(earlier) if earlier else None)
    keep = None
    if body.store:
        conversation = [*earlier, *with_ids(_items_as_sent(body))]

        async def keep(response: dict[str, Any]) -> bool:
            return await state.response_store.put(response, conversation)

    answer = ResponsesAnswer(body, state.served_name, keep)
    try:
        return await serve(state, request, translation.chat, "chat", arrival, answer)
    except OpenAIError as exc:
        raise translation.error(exc) from None
    except ValidationError as exc:  # a chat schema's, after the translation
        error = errors.from_validation_errors(exc.errors())  # type: ignore[arg-type]
        raise translation.error(error) from None


def _items_as_sent(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as items (JSON), as they are stored for the conversation and
    listed by input_items: a message's text content as one text part (OpenAI's listing)."""
    items = []
    for item in body.items():
        data = item.model_dump(exclude_none=True)
        if isinstance(item, MessageItem) and isinstance(item.content, str):
            kind = "output_text" if item.role == "assistant" else "input_text"
            data["content"] = [{"type": kind, "text": item.content}]
        items.append(data)
    return items


async def retrieve(state: FrontendState, request: Request) -> Response:
    """GET /v1/responses/{response_id}."""
    record = await state.response_store.get(request.path_params["response_id"])
    return json_response(record["response"])


async def delete(state: FrontendState, request: Request) -> Response:
    """DELETE /v1/responses/{response_id}."""
    response_id = request.path_params["response_id"]
    await state.response_store.delete(response_id)
    return json_response({"id": response_id, "object": "response.deleted", "deleted": True})


async def input_items(state: FrontendState, request: Request) -> Response:
    """GET /v1/responses/{response_id}/input_items: the conversation's items that led to
    the response (`order` desc, OpenAI's default, or asc; `limit` 1..100, default 20;
    `after`: an item id, the page after it)."""
    record = await state.response_store.get(request.path_params["response_id"])
    query = request.query_params
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise errors.bad_request(f"order: 'asc' or 'desc', not {order!r}", param="order")
    limit_text = query.get("limit", "20")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
        raise errors.bad_request(f"limit: 1..100, not {limit_text!r}", param="limit")
    items: list[dict[str, Any]] = record["input"]
    if order == "desc":
        items = items[::-1]
    after = query.get("after")
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise errors.bad_request(f"after: no item {after!r} in this list", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[: int(limit_text)]
    return json_response({
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > len(page),
    })  # fmt: skip
