"""The endpoints of OpenAI's Responses API: `POST /v1/responses` (through the chat path:
`frontend.responses_api` translates the request, `frontend.serving.serve` serves it,
`frontend.response_objects` writes the answer), and the stored responses' `GET`,
`DELETE` and `GET .../input_items` (`frontend.response_store`); a background one's
`POST .../cancel` and its events streamed again (`frontend.background`).

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
from frontend.responses import SSEResponse, json_response
from frontend.responses_api import (
    MessageItem,
    ResponsesRequest,
    conversation_length,
    parse_items,
    parse_request,
    translate,
)
from frontend.serving import fewest_tokens, prompt_length, read_json_body, serve
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
    earlier_items = parse_items(earlier) if earlier else None
    translation, dropped = translate(body, earlier_items), 0
    keep = None
    conversation: list[dict[str, Any]] = []
    if body.store:  # the whole conversation, also where truncation left items out
        conversation = [*earlier, *with_ids(_items_as_sent(body))]
        owner = state.frontend_id if body.background else None  # who keeps its events

        async def keep(response: dict[str, Any]) -> bool:
            return await state.response_store.put(response, conversation, owner)

    last = conversation_length(body, earlier_items) - 1  # the last item always stays
    while True:
        answer = ResponsesAnswer(body, state.served_name, keep)
        detach = None
        if body.background:  # generated as a stream, whether or not the client reads it
            translation.chat.stream = True
            detach = state.background.detach(answer, body.stream, conversation)
        try:
            return await serve(state, request, translation.chat, "chat", arrival, answer,
                               detach)  # fmt: skip
        except OpenAIError as exc:
            too_long = exc.code == "context_length_exceeded"
            if too_long and body.truncation == "auto" and dropped < last:
                # only a conversation too long pays for the fitting (and tokenizes again)
                dropped = _fewest_dropped(state, body, earlier_items, dropped + 1, last)
                translation = translate(body, earlier_items, dropped)
                continue
            raise translation.error(exc) from None
        except ValidationError as exc:  # a chat schema's, after the translation
            error = errors.from_validation_errors(exc.errors())  # type: ignore[arg-type]
            raise translation.error(error) from None


def _fewest_dropped(
    state: FrontendState, body: ResponsesRequest, earlier: list[Any] | None, low: int, last: int
) -> int:
    """`truncation: "auto"`: how many of the conversation's first items to leave out (at
    least `low`, at most `last`) for the prompt and `max_output_tokens` to fit the context:
    the fewest that do by the text's tokens (OpenAI drops items from the beginning of the
    conversation; instructions stay), by bisection over the item count with a character
    floor before any tokenizing. An image counts as its placeholder token here, so serving
    may still refuse the result: the caller then asks again from one item more. With no
    worker up to tell the context, `low`."""
    limit = state.context_limit()
    if limit is None:
        return low
    room = limit - (body.max_output_tokens or 1)

    def fits(dropped: int) -> bool:
        chat = translate(body, earlier, dropped).chat
        return fewest_tokens(state, chat) <= room and prompt_length(state, chat) <= room

    if not fits(last):
        return last  # the last item alone is too long: serve refuses it by name
    high = last  # fits; `low - 1` is known not to
    low -= 1
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle
    return high


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
    """GET /v1/responses/{response_id}: the stored response (a background one's status
    now); with `stream=true`, a streamed background response's events after
    `starting_after` (a sequence number; default: all), live until it ends."""
    query = request.query_params
    stream = query.get("stream", "false").lower()
    if stream not in ("true", "false"):
        raise errors.bad_request(f"stream: true or false, not {stream!r}", param="stream")
    after_text = query.get("starting_after", "-1")
    try:
        after = int(after_text)
    except ValueError:
        raise errors.bad_request(
            f"starting_after: an event's sequence number (an integer), not {after_text!r}",
            param="starting_after",
        ) from None
    record = await state.response_store.get(request.path_params["response_id"])
    if stream == "true":
        events, on_close = await state.background.events(record, after)
        return SSEResponse(events, on_close)
    return json_response(await state.background.current(record))


async def cancel(state: FrontendState, request: Request) -> Response:
    """POST /v1/responses/{response_id}/cancel: a background response stopped (cancelled,
    with the output so far), from any frontend process; one that ended comes back as it
    is (OpenAI's: cancelling is idempotent); a foreground one is a 400."""
    response_id = request.path_params["response_id"]
    record = await state.response_store.get(response_id)
    if not record["response"].get("background"):
        raise errors.bad_request(
            f"response_id: only background responses can be cancelled; {response_id} was "
            "not created with background true", param="response_id",
        )  # fmt: skip
    return json_response(await state.background.cancel(record))


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
