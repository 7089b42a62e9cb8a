"""Unit tests of response assembly (`frontend.responses`) for requests of several choices:
the full JSON body, the SSE stream (interleaved choices, per-choice finish, usage, [DONE]),
usage and metrics, over a scripted in-process client (no NATS) and the real tokenizer."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from starlette.responses import Response
from test_choices import PerSeedClient, choices_over
from test_migration import chunk, deadline

from contract.messages import (
    GenerateOutput,
    GenerateRequest,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)
from frontend.choices import choice_requests
from frontend.metrics import FrontendMetrics
from frontend.openai_schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from frontend.prepared import Prepared, Prompt
from frontend.responses import (
    WATCH_AFTER_S,
    AnsweredResponse,
    ChoiceText,
    ClientGone,
    FirstToken,
    Generation,
    full_response,
    record,
    stream_events,
    until_disconnect,
    usage_of,
)
from frontend.tokenization import TextTokenizer

PROMPT = [11, 12, 13, 14]


def make_state(tokenizer: TextTokenizer) -> Any:
    return SimpleNamespace(
        tokenizer=tokenizer,
        metrics=FrontendMetrics(),
        config=SimpleNamespace(frontend=SimpleNamespace(request_timeout_s=5.0)),
    )


def prepared_for(kind: str, **body: Any) -> Prepared:
    if kind == "chat":
        parsed: Any = ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hi"}], **body}
        )
    else:
        parsed = CompletionRequest.model_validate({"prompt": PROMPT, **body})
    prompts = [Prompt(list(PROMPT), "messages" if kind == "chat" else "prompt")]
    return Prepared(kind, parsed, "smol", prompts, SamplingParams(), time.perf_counter())  # type: ignore[arg-type]


def ids(tokenizer: TextTokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def lp(token: int) -> TokenLogprob:
    top = [TopLogprob(token_id=token, logprob=-0.5)]
    return TokenLogprob(token_id=token, logprob=-0.5, top=top)


def sse(body: list[bytes]) -> list[Any]:
    events = []
    for raw in body:
        assert raw.startswith(b"data: ") and raw.endswith(b"\n\n"), raw
        payload = raw[len(b"data: ") : -2].decode()
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ---- usage and the full response ---------------------------------------------------------


def gathered(
    state: Any, prepared: Prepared, outputs: list[list[GenerateOutput]]
) -> list[ChoiceText]:
    first_token = FirstToken(state.metrics, prepared.arrival)
    texts = []
    for chunks in outputs:
        text = ChoiceText(Generation(state, prepared, first_token))
        for output in chunks:
            text.add(output, prepared.logprobs is not None)
        texts.append(text)
    return texts


def test_usage_counts_the_prompt_once_and_every_choice_completion(tokenizer: TextTokenizer) -> None:
    state = make_state(tokenizer)
    prepared = prepared_for("chat", n=3)
    a, b, c = ids(tokenizer, "One two"), ids(tokenizer, "Three four five"), ids(tokenizer, "Six")
    texts = gathered(state, prepared, [
        [chunk(*a, finish="stop", prompt=4, cached=0)],
        [chunk(*b, finish="length", prompt=4, cached=3)],
        [chunk(*c, finish="stop", prompt=4, cached=3)],
    ])  # fmt: skip
    usage = usage_of([t.generation for t in texts])
    assert usage == {
        "prompt_tokens": 4,
        "completion_tokens": len(a) + len(b) + len(c),
        "total_tokens": 4 + len(a) + len(b) + len(c),
    }  # choice 0 computed the prompt: it was not cached for the request
    record(state.metrics, prepared, [t.generation for t in texts])
    metrics = state.metrics
    assert metrics.prompt_tokens._value.get() == 4  # once per request
    assert metrics.completion_tokens._value.get() == len(a) + len(b) + len(c)
    assert metrics.cached_prompt_tokens._value.get() == 6  # each choice's own
    ttft_count = sum(bucket.get() for bucket in metrics.ttft._buckets)
    assert ttft_count == 1  # one time to first token per request, not per choice
    warm = gathered(state, prepared, [[chunk(1, finish="stop", prompt=4, cached=3)]] * 2)
    assert usage_of([t.generation for t in warm])["prompt_tokens_details"] == {"cached_tokens": 3}


def test_a_batch_counts_each_prompt_once_and_echoes_its_own(tokenizer: TextTokenizer) -> None:
    """Two prompts x n=2: usage sums the prompts (each once) and every completion, cached
    tokens per prompt (the least of its choices), summed; with echo each choice's text
    starts with its own prompt's."""
    state = make_state(tokenizer)
    parsed = CompletionRequest.model_validate({"prompt": ["ab", "cde"], "n": 2, "echo": True})
    prompts = [Prompt([1, 2, 3], "prompt.0", "ab"), Prompt([4, 5, 6, 7, 8], "prompt.1", "cde")]
    prepared = Prepared(
        "completion", parsed, "smol", prompts, SamplingParams(), time.perf_counter()
    )
    a, b = ids(tokenizer, "One two"), ids(tokenizer, "Three")
    texts = []
    first_token = FirstToken(state.metrics, prepared.arrival)
    outputs = [(a, 3, 0), (a, 3, 2), (b, 5, 4), (b, 5, 4)]
    for index, (tokens, prompt_len, cached) in enumerate(outputs):
        text = ChoiceText(Generation(state, prepared, first_token, prepared.prompt_of(index)))
        text.add(chunk(*tokens, finish="stop", prompt=prompt_len, cached=cached), False)
        texts.append(text)
    completion = 2 * len(a) + 2 * len(b)
    body = full_response(state, prepared, texts, simulated=False)  # type: ignore[arg-type]
    assert body["usage"] == {
        "prompt_tokens": 8,
        "completion_tokens": completion,
        "total_tokens": 8 + completion,
        "prompt_tokens_details": {"cached_tokens": 4},  # prompt 0: 0, prompt 1: 4
    }
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == (
        ["ab" + tokenizer.decode(a)] * 2 + ["cde" + tokenizer.decode(b)] * 2
    )
    record(state.metrics, prepared, [t.generation for t in texts])
    assert state.metrics.prompt_tokens._value.get() == 8  # each prompt once


def test_full_chat_response_has_one_choice_per_index(tokenizer: TextTokenizer) -> None:
    state = make_state(tokenizer)
    prepared = prepared_for("chat", n=2, logprobs=True, top_logprobs=1)
    a, b = ids(tokenizer, "Paris is"), ids(tokenizer, "Lyon")
    texts = gathered(state, prepared, [
        [GenerateOutput(request_id="x", token_ids=a, logprobs=[lp(t) for t in a],
                        finish_reason="length", num_prompt_tokens=4)],
        [GenerateOutput(request_id="x", token_ids=b, logprobs=[lp(t) for t in b],
                        finish_reason="stop", num_prompt_tokens=4)],
    ])  # fmt: skip
    body = full_response(state, prepared, texts, simulated=False)
    ChatCompletionResponse.model_validate(body)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == ["Paris is", "Lyon"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    assert [len(c["logprobs"]["content"]) for c in body["choices"]] == [len(a), len(b)]
    assert body["usage"]["completion_tokens"] == len(a) + len(b)
    assert "simulated" not in body


def test_full_completion_response_offsets_start_at_zero_per_choice(
    tokenizer: TextTokenizer,
) -> None:
    state = make_state(tokenizer)
    prepared = prepared_for("completion", n=2, logprobs=0)
    a = ids(tokenizer, " sea and sky")
    texts = gathered(state, prepared, [
        [GenerateOutput(request_id="x", token_ids=a, logprobs=[lp(t) for t in a],
                        finish_reason="length")],
    ] * 2)  # fmt: skip
    body = full_response(state, prepared, texts, simulated=True)
    CompletionResponse.model_validate(body)
    assert [c["text"] for c in body["choices"]] == [" sea and sky"] * 2
    assert [c["logprobs"]["text_offset"][0] for c in body["choices"]] == [0, 0]
    assert body["simulated"] is True and body["object"] == "text_completion"


# ---- the SSE stream --------------------------------------------------------------------


async def stream_of(state: Any, prepared: Prepared, client: PerSeedClient, seed: int) -> list[Any]:
    """Every SSE event of `prepared`'s choices (seeds seed, seed + 1, ...) over `client`."""
    first = GenerateRequest(
        request_id="c0", client_id=prepared.response_id, token_ids=list(PROMPT),
        sampling=SamplingParams(max_tokens=50, seed=seed),
    )  # fmt: skip
    choices = choices_over(client, choice_requests(first, prepared.n))
    await choices.start(deadline())
    return sse([event async for event in stream_events(state, prepared, choices, deadline())])


def choice_of(event: dict[str, Any]) -> dict[str, Any]:
    assert len(event["choices"]) == 1
    return event["choices"][0]


async def test_chat_stream_interleaves_choices_and_sums_usage(tokenizer: TextTokenizer) -> None:
    state = make_state(tokenizer)
    prepared = prepared_for("chat", n=3, stream=True, stream_options={"include_usage": True})
    words = [ids(tokenizer, text) for text in ("Red green blue", "Cats and dogs", "Sun")]
    client = PerSeedClient({"a": []}, {
        10 + i: [*(chunk(t, prompt=4) for t in w[:-1]),
                 chunk(w[-1], finish="stop" if i != 1 else "length", prompt=4)]
        for i, w in enumerate(words)
    }, trickle=True)  # fmt: skip
    events = await stream_of(state, prepared, client, seed=10)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    usage, chunks = events[-2], events[:-2]
    for event in [*chunks, usage]:
        ChatCompletionChunk.model_validate(event)
    # a role chunk per choice first, then the choices' contents interleaved as they came
    assert [choice_of(e)["delta"] for e in chunks[:3]] == [{"role": "assistant", "content": ""}] * 3
    assert [choice_of(e)["index"] for e in chunks[:3]] == [0, 1, 2]
    order = [choice_of(e)["index"] for e in chunks[3:]]
    assert order != sorted(order)  # not one choice after the other
    for index, expected in enumerate(("Red green blue", "Cats and dogs", "Sun")):
        mine = [choice_of(e) for e in chunks[3:] if choice_of(e)["index"] == index]
        assert "".join(c["delta"].get("content", "") for c in mine) == expected
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [
            "length" if index == 1 else "stop"
        ]
        assert mine[-1]["finish_reason"] is not None  # the finish chunk ends the choice
    assert all(e["usage"] is None for e in chunks)
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": sum(len(w) for w in words),
        "total_tokens": 4 + sum(len(w) for w in words),
    }
    assert client.aborts == [] and client.in_flight == 0


async def test_a_stop_string_ends_its_choice_alone(tokenizer: TextTokenizer) -> None:
    state = make_state(tokenizer)
    prepared = prepared_for("completion", n=2, stream=True, stop=["END"])
    a, b = ids(tokenizer, " one END two three"), ids(tokenizer, " four five")
    client = PerSeedClient({"a": []}, {
        1: [chunk(t) for t in a],  # no finish: the stop string must end it
        2: [*(chunk(t) for t in b[:-1]), chunk(b[-1], finish="length")],
    })  # fmt: skip
    events = await stream_of(state, prepared, client, seed=1)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, list[str]] = {0: [], 1: []}
    for event in events[:-1]:
        choice = choice_of(event)
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finishes[choice["index"]].append(choice["finish_reason"])
    assert texts == {0: " one ", 1: " four five"}
    assert finishes == {0: ["stop"], 1: ["length"]}
    aborted = [rid for _, rid in client.aborts]
    assert len(aborted) == 1 and aborted[0] == client.opened[0][1].request_id


async def test_an_error_in_one_choice_ends_the_stream_and_aborts_all(
    tokenizer: TextTokenizer,
) -> None:
    state = make_state(tokenizer)
    prepared = prepared_for("chat", n=2, stream=True)
    client = PerSeedClient({"a": []}, {
        1: [chunk(*ids(tokenizer, "Hello"))],  # still running
        2: [chunk(*ids(tokenizer, "Hi")),
            GenerateOutput(request_id="x", finish_reason="error", error="device lost")],
    })  # fmt: skip
    events = await stream_of(state, prepared, client, seed=1)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    error = events[-2]["error"]
    assert error["type"] == "server_error" and "device lost" in error["message"]
    assert [rid for _, rid in client.aborts] == [client.opened[0][1].request_id]
    assert client.in_flight == 0


@pytest.mark.parametrize("kind", ["chat", "completion"])
async def test_one_choice_streams_as_before(tokenizer: TextTokenizer, kind: str) -> None:
    state = make_state(tokenizer)
    prepared = prepared_for(kind, stream=True)
    words = ids(tokenizer, "Just one answer")
    client = PerSeedClient({"a": [*(chunk(t) for t in words[:-1]),
                                  chunk(words[-1], finish="stop")]}, {})  # fmt: skip
    events = await stream_of(state, prepared, client, seed=3)
    assert events[-1] == "[DONE]"
    assert {choice_of(e)["index"] for e in events[:-1]} == {0}
    key = "delta" if kind == "chat" else None
    text = "".join(
        (choice_of(e)[key].get("content", "") if key else choice_of(e)["text"])
        for e in events[:-1]
    )
    assert text == "Just one answer"
    assert len(client.opened) == 1


async def test_until_disconnect_reads_nothing_from_a_fast_request() -> None:
    """A request answered within WATCH_AFTER_S starts no watcher: `receive` is never read."""
    reads = 0

    async def receive() -> dict:
        nonlocal reads
        reads += 1
        await asyncio.Event().wait()  # the client stays
        return {"type": "http.disconnect"}

    async def work() -> str:
        await asyncio.sleep(0)
        return "answered"

    assert await until_disconnect(receive, work()) == "answered"
    await asyncio.sleep(WATCH_AFTER_S * 2)
    assert reads == 0


async def test_until_disconnect_cancels_a_slow_request_whose_client_left() -> None:
    """The client left before the watcher started: its first read sees the disconnect, the
    work is cancelled and ClientGone raised, long before the work would have ended."""
    cancelled = asyncio.Event()
    work_s = 30.0

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def work() -> None:
        try:
            await asyncio.sleep(work_s)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ClientGone):
        await until_disconnect(receive, work())
    assert cancelled.is_set()
    assert loop.time() - started < work_s  # cancelled, not waited out (no speed limit)


def test_an_answer_is_sent_before_its_bookkeeping() -> None:
    """The router release and the metrics (`after`) run once the body was handed to the
    server, and still run when sending fails (a client gone): nothing is left in flight."""
    events: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        events.append(message["type"])

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    after = [lambda: events.append("release"), lambda: events.append("metrics")]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
    asyncio.run(AnsweredResponse({"id": "x"}, after)(scope, receive, send))
    assert events == ["http.response.start", "http.response.body", "release", "metrics"]

    async def broken_send(message: dict[str, Any]) -> None:
        raise OSError("connection reset")

    events.clear()
    with pytest.raises(OSError):
        asyncio.run(AnsweredResponse({"id": "x"}, after)(scope, receive, broken_send))
    assert events == ["release", "metrics"]


def _sent_by(response: Response) -> list[tuple[Any, ...]]:
    """What `response` hands the server: (type, status, headers, body) per message."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
    asyncio.run(response(scope, receive, send))
    return [(m["type"], m.get("status"), m.get("headers"), m.get("body")) for m in sent]


def test_an_answer_has_the_head_starlette_would_write() -> None:
    """AnsweredResponse writes its head itself: the same status and headers (in order) as
    Starlette's Response with the X-Request-Id header set, and the same body."""
    data = {"id": "chatcmpl-1", "choices": [{"message": {"content": "héllo"}}]}
    for request_id in ("chatcmpl-1", None):
        expected = Response(orjson.dumps(data), media_type="application/json")
        if request_id is not None:
            expected.headers["X-Request-Id"] = request_id
        answered = AnsweredResponse(data, [], request_id)
        assert _sent_by(answered) == _sent_by(expected)
        assert answered.status_code == 200
        answered.headers["X-Hpcserve-Frontend"] = "3"  # one more, as several processes add
        assert answered.raw_headers[-1] == (b"x-hpcserve-frontend", b"3")
