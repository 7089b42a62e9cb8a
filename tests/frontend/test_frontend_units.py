"""Unit tests: request schemas and error mapping, routers, detokenizer, stop matcher."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest
from pydantic import ValidationError
from worker_cards import worker_card

from contract.discovery import WorkerCard
from contract.messages import GenerateOutput, GenerateRequest, LoadMetrics, SamplingParams
from frontend import errors
from frontend.openai_schemas import ChatCompletionRequest, CompletionRequest
from frontend.router import (
    LeastLoadedRouter,
    LoadTracker,
    RandomRouter,
    RoundRobinRouter,
    make_router,
)
from frontend.state import able_workers
from frontend.tokenization import (
    ChatTemplateError,
    IncrementalDetokenizer,
    StopMatcher,
    TextTokenizer,
)
from frontend.worker_client import Inbox, RequestStream, WorkerClient, WorkerLost

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# ---- schemas ---------------------------------------------------------------------------


def error_for(model: type, data: dict[str, Any]) -> errors.OpenAIError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return errors.from_validation_errors(info.value.errors())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "x"}]}, "messages.1.role"),
        ({"messages": [{"role": "user"}]}, "messages.0"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "url": "u"}]}]},
            "messages.0.content.0.type",
        ),
        ({"messages": "hello"}, "messages"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop": ["1", "2", "3", "4", "5"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"n": 0}, "n"),
        ({"n": "two"}, "n"),
        ({"seed": 2**63}, "seed"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"seed": "abc"}, "seed"),
        ({"stream": "maybe"}, "stream"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"stream_options": {"include_usage": "x"}}, "stream_options.include_usage"),
    ],
)
def test_chat_request_errors_name_the_field(patch: dict[str, Any], param: str) -> None:
    error = error_for(ChatCompletionRequest, {**CHAT, **patch})
    assert error.status == 400
    assert error.param == param
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_chat_request_accepts_openai_shapes() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            **CHAT,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None, "tool_calls": []},
            ],
            "stop": "END",
            "max_completion_tokens": 7,
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 2,
            "stream_options": {"include_usage": True},
            "unknown_field": {"ignored": True},
        }
    )
    assert request.messages[1].text() == "ab"
    assert request.stop_strings() == ["END"]
    assert request.requested_max_tokens() == 7
    assert request.requested_logprobs() == 2
    assert request.include_usage_in_stream()
    plain = ChatCompletionRequest.model_validate(CHAT)
    assert plain.requested_logprobs() is None and plain.requested_max_tokens() is None


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"logprobs": 21}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 0, "echo": True}, "max_tokens"),
        ({"max_tokens": 0, "logprobs": 1}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"n": 2, "best_of": 3}, "best_of"),
    ],
)
def test_completion_request_errors(patch: dict[str, Any], param: str) -> None:
    error = error_for(CompletionRequest, {"model": "m", "prompt": "x", **patch})
    assert (error.status, error.param) == (400, param)


def test_completion_prompt_forms() -> None:
    """One prompt (text or ids) or a batch of them (texts or id lists), named in errors as
    `prompt` or `prompt.<i>`."""
    forms: list[tuple[Any, list[Any], list[str]]] = [
        ("hi", ["hi"], ["prompt"]),
        ([1, 2], [[1, 2]], ["prompt"]),
        (["only"], ["only"], ["prompt.0"]),
        (["a", "b"], ["a", "b"], ["prompt.0", "prompt.1"]),
        ([[4, 5], [6]], [[4, 5], [6]], ["prompt.0", "prompt.1"]),
    ]
    for prompt, prompts, params in forms:
        request = CompletionRequest.model_validate({"prompt": prompt})
        assert request.prompts() == prompts
        assert [request.prompt_param(i) for i in range(len(prompts))] == params
    assert CompletionRequest.model_validate({"prompt": "x", "echo": True}).echo


def test_a_prompt_of_mixed_forms_is_refused_saying_which_item() -> None:
    """pydantic's own error names one branch of the prompt union (for a text batch with
    token ids in it: "prompt.0: should be a valid integer"); ours names the odd item."""
    cases: list[tuple[Any, str]] = [
        (["text", [1, 2]], "item 1 is a token-id list but item 0 is a text"),
        ([[1, 2], "x"], "item 1 is a text but item 0 is a token-id list"),
        ([1, "a"], "item 1 is a text but item 0 is a token id"),
        ([None], "item 0 is null"),
        ([[1, "a"]], "item 0 is a list"),
        ({"a": 1}, "must be a text or a list, not an object"),
        (5, "must be a text or a list, not a number"),
        ([], "must not be empty"),
    ]
    for prompt, says in cases:
        error = error_for(CompletionRequest, {"prompt": prompt})
        assert error.param == "prompt", (prompt, error.param)
        assert error.message.startswith(f"prompt: {says}"), (prompt, error.message)


def test_missing_prompt_and_bad_json() -> None:
    error = error_for(CompletionRequest, {"model": "m"})
    assert error.param == "prompt" and "required" in error.message
    with pytest.raises(errors.OpenAIError) as info:
        errors.parse_json_body(b"{nope")
    assert info.value.status == 400
    with pytest.raises(errors.OpenAIError):
        errors.parse_json_body(b"[1, 2]")


# ---- routers ---------------------------------------------------------------------------


def card(worker_id: str, capacity: int = 8) -> WorkerCard:
    return worker_card(worker_id, capacity=capacity, max_model_len=100)


def test_round_robin_order_is_stable() -> None:
    router = RoundRobinRouter()
    cards = [card("c"), card("a"), card("b")]
    chosen = [router.choose(cards, None).worker_id for _ in range(6)]
    assert chosen == ["a", "b", "c", "a", "b", "c"]


def test_random_covers_all() -> None:
    router = RandomRouter(seed=1)
    cards = [card(name) for name in "abcd"]
    counts = Counter(router.choose(cards, None).worker_id for _ in range(400))
    assert set(counts) == set("abcd") and min(counts.values()) > 50


def test_least_loaded_picks_min() -> None:
    tracker = LoadTracker()
    router = LeastLoadedRouter(tracker)
    cards = [card("a"), card("b"), card("c")]
    for _ in range(3):
        tracker.started("a")
    tracker.started("b")
    tracker.update(LoadMetrics(worker_id="c", active_sequences=5))
    assert router.choose(cards, None).worker_id == "b"
    tracker.finished("b")
    assert router.choose(cards, None).worker_id == "b"
    tracker.update(LoadMetrics(worker_id="b", active_sequences=2, waiting_sequences=4))
    assert router.choose(cards, None).worker_id == "a"  # a: 3 in flight, b: 6, c: 5
    # capacity matters: 3 of 8 is busier than 3 of 64
    big = card("z", capacity=64)
    for _ in range(3):
        tracker.started("z")
    assert router.choose([card("a"), big], None).worker_id == "z"


def test_least_loaded_spreads_ties() -> None:
    router = LeastLoadedRouter(LoadTracker())
    cards = [card("a"), card("b")]
    assert {router.choose(cards, None).worker_id for _ in range(2)} == {"a", "b"}


def test_make_router() -> None:
    tracker = LoadTracker()
    assert isinstance(make_router("round_robin", tracker), RoundRobinRouter)
    assert isinstance(make_router("least_loaded", tracker), LeastLoadedRouter)
    with pytest.raises(ValueError, match=r"frontend\.router"):
        make_router("kv-magic", tracker)


# ---- tokenizer, detokenizer, stops -----------------------------------------------------

TEXTS = [
    "héllo 😀 世界 日本語のテキスト 👩‍👩‍👧 naïve café — ok",
    "emoji run 🎉🎉🎉 and 한국어 and Ελληνικά",
    "plain ascii text with numbers 12345",
]


def test_tokenizer_reads_model_folder(tokenizer: TextTokenizer) -> None:
    assert tokenizer.eos_token_ids == [2]
    assert tokenizer.max_model_len == 8192
    assert 0 in tokenizer.special_token_ids and 2 in tokenizer.special_token_ids
    prompt = tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == 1 and ids[-1] != 2  # template wrote <|im_start|>, no EOS added


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_detokenizer_never_emits_broken_utf8(
    tokenizer: TextTokenizer, text: str, chunk: int
) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "go"}])
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.finish())
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    # a multi-byte character really was split across tokens here (one token at a time: a
    # token holding only part of a character adds no text yet)
    if text != TEXTS[2] and chunk == 1:
        assert any(delta == "" for delta in deltas[:-1])


def test_detokenizer_skips_special_tokens_and_flushes_tail(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.add([token]) for token in [*ids, 2])
    assert text + detok.finish() == "ok 😀"
    cut = IncrementalDetokenizer(tokenizer)
    partial = "".join(cut.add([token]) for token in ids[:-1])
    assert "\ufffd" not in partial
    tail = cut.finish()  # generation stopped mid-character: released as decode() would
    assert partial + tail == tokenizer.decode(ids[:-1])


def test_token_piece_bytes_are_exact(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode("😀 世界", add_special_tokens=False)
    raw = b"".join(bytes(tokenizer.token_piece(token)[1]) for token in ids)
    assert raw.decode() == "😀 世界"
    assert tokenizer.token_piece(2)[0] == "<|im_end|>"


def test_token_bytes_of_the_whole_vocabulary_are_exact(tokenizer: TextTokenizer) -> None:
    """The start-up table of every token's bytes: each token decodes alone as the library
    decodes it (special tokens to nothing); any run of tokens to the library's decode of the
    run (bytes of partial characters joined); ids past the vocabulary still answer."""
    assert len(tokenizer._token_bytes_table) == tokenizer.vocab_size
    for token in range(tokenizer.vocab_size):
        raw = tokenizer.token_bytes(token)
        assert raw.decode("utf-8", errors="replace") == tokenizer.decode([token]), token
        assert raw == (b"" if token in tokenizer.special_token_ids
                       else bytes(tokenizer.token_piece(token)[1]))  # fmt: skip
    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 12))]
        raw = b"".join(map(tokenizer.token_bytes, ids))
        assert raw.decode("utf-8", errors="replace") == tokenizer.decode(ids), ids
    past = tokenizer.vocab_size + 3
    assert tokenizer.token_bytes(past) == bytes(tokenizer.token_piece(past)[1])


def run_stops(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopMatcher(stops)
    out: list[str] = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_split_across_chunks() -> None:
    out, stopped = run_stops(["STOP"], ["Hello S", "T", "OP and more"])
    assert stopped and "".join(out) == "Hello "
    assert out[0] == "Hello "  # "S" held back: it might start "STOP"


def test_held_back_text_released() -> None:
    out, stopped = run_stops(["STOP"], ["abc ST", "ONE"])
    assert not stopped and "".join(out) == "abc STONE"
    out, stopped = run_stops(["STOP"], ["ends with ST"])
    assert not stopped and out == ["ends with ", "ST"]


def test_earliest_of_several_stops_wins() -> None:
    out, stopped = run_stops(["world", "lo w"], ["hello world"])
    assert stopped and "".join(out) == "hel"
    out, stopped = run_stops([], ["no stops"])
    assert not stopped and "".join(out) == "no stops"


def test_stop_matcher_random_splits() -> None:
    rng = random.Random(0)
    text = "one two three <END> four"
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), 5))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        out, stopped = run_stops(["<END>", "nope"], pieces)
        assert stopped and "".join(out) == "one two three "


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "  spaced  \n"}, {"role": "user", "content": "😀 世界"}],
        [
            {"role": "user", "content": "a<|im_end|>b <|endoftext|> c"},
            {"role": "assistant", "content": "\n\n  x  "},
            {"role": "user", "content": "long " * 2000},
        ],
    ],
)
def test_cached_template_encoding_equals_plain_encode(
    tokenizer: TextTokenizer, messages: list[dict[str, str]]
) -> None:
    text = tokenizer.render_chat(messages)
    plain = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.encode_chat(messages) == plain
    assert tokenizer.encode_chat(messages) == plain  # second time from the cache


def test_chat_render_equals_the_templates_own_render(tokenizer: TextTokenizer) -> None:
    """render_chat skips Template.render's per-call copy of the globals; the text is the
    same as Template.render's on random conversations, and the template's own errors
    still come out as ChatTemplateError."""
    rng = random.Random(3)
    template = tokenizer._chat_template
    assert template is not None
    for _ in range(50):
        messages = [
            {"role": rng.choice(["system", "user", "assistant"]), "content": rng.choice(TEXTS)}
            for _ in range(rng.randrange(1, 6))
        ]
        expected = template.render(messages=messages, add_generation_prompt=True,
                                   bos_token=tokenizer.bos_token or "",
                                   eos_token=tokenizer.eos_token or "")  # fmt: skip
        assert tokenizer.render_chat(messages) == expected
    with pytest.raises(ChatTemplateError, match="the chat template failed"):
        tokenizer.render_chat([{"role": "user", "content": "hi"}, 3])  # type: ignore[list-item]


def _card(worker_id: str, role: str) -> WorkerCard:
    return WorkerCard(
        worker_id=worker_id, role=role, model="m", block_size=16, subject=f"{worker_id}.gen",
        abort_subject=f"{worker_id}.abort", capacity=4, max_model_len=64,
    )  # fmt: skip


async def test_handoff_chunk_moves_the_request_to_the_decode_worker() -> None:
    prefill, decode = _card("prefill-1", "prefill"), _card("decode-1", "decode")
    tracker = LoadTracker()
    client = WorkerClient("nats://unused", "d", tracker)
    client.on_workers_changed({c.worker_id: c for c in (prefill, decode)})
    stream = RequestStream(client, prefill, "r1")
    client._streams["r1"] = stream
    tracker.started(prefill.worker_id)
    chunks = [
        GenerateOutput(request_id="r1", token_ids=[5]),  # the prefill's first token
        GenerateOutput(request_id="r1", worker_id="decode-1"),  # the hand-off announcement
        GenerateOutput(request_id="r1", token_ids=[6]),
    ]
    for chunk in chunks:
        stream.queue.put_nowait(chunk.model_dump_json().encode())
    deadline = asyncio.get_running_loop().time() + 5
    assert (await stream.next(deadline)).token_ids == [5]
    assert (await stream.next(deadline)).token_ids == [6]  # the announcement is consumed
    assert stream.card is decode
    assert dict(tracker.in_flight) == {"decode-1": 1}
    client.on_workers_changed({prefill.worker_id: prefill})  # the decode worker died
    with pytest.raises(WorkerLost) as info:
        await stream.next(deadline)
    assert info.value.worker_id == "decode-1"
    stream.close()
    assert client.in_flight == 0 and not tracker.in_flight


@pytest.mark.parametrize("byte_level", [True, False])
def test_both_detokenizer_paths_equal_a_full_decode(
    tokenizer: TextTokenizer, byte_level: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The byte-level fast path (token bytes + an incremental UTF-8 decoder) and the decode
    window agree with `decode()` on random ids: split characters, special tokens and all."""
    assert tokenizer.byte_level  # SmolLM2's tokenizer: the fast path is the one served
    monkeypatch.setattr(tokenizer, "_byte_level", byte_level)
    rng = random.Random(7)
    specials = sorted(tokenizer.special_token_ids)
    for _ in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        ids.insert(rng.randrange(len(ids)), specials[0])
        detok = IncrementalDetokenizer(tokenizer)
        text, i = "", 0
        while i < len(ids):
            step = rng.randrange(1, 4)
            text += detok.add(ids[i : i + step])
            i += step
        assert text + detok.finish() == tokenizer.decode(ids), ids


async def test_a_batch_of_replies_reaches_each_request_and_a_malformed_one_fails_them() -> None:
    from contract.messages import outputs_json

    card = _card("agg-1", "agg")
    client = WorkerClient("nats://unused", "d", LoadTracker())
    streams = {rid: RequestStream(client, card, rid) for rid in ("r1", "r2")}
    client._streams.update(streams)
    client._on_batch(outputs_json([
        GenerateOutput(request_id="r1", token_ids=[5]),
        GenerateOutput(request_id="r2", token_ids=[7, 8]),
        GenerateOutput(request_id="gone", token_ids=[9]),  # finished meanwhile: dropped
        GenerateOutput(request_id="r1", token_ids=[6], finish_reason="length"),
    ]))  # fmt: skip
    deadline = asyncio.get_running_loop().time() + 5
    assert (await streams["r1"].next(deadline)).token_ids == [5]
    assert (await streams["r1"].next(deadline)).finish_reason == "length"
    assert (await streams["r2"].next(deadline)).token_ids == [7, 8]
    client._on_batch(b'[{"request_id": "r2", "token_ids": "not a list"}]')
    with pytest.raises(errors.OpenAIError) as info:
        await streams["r2"].next(deadline)
    assert info.value.status == 502 and "malformed" in str(info.value)


async def test_busy_poll_runs_while_requests_wait_and_not_past_its_time() -> None:
    """`frontend.busy_poll_us`: a reply (or a sent request) keeps the loop polling while
    requests wait; it stops when none is left, or `busy_poll_s` after the last activity;
    off by default."""
    from contract.messages import outputs_json

    card = _card("agg-1", "agg")
    reply = outputs_json([GenerateOutput(request_id="r1", token_ids=[5])])
    client = WorkerClient("nats://unused", "d", LoadTracker(), busy_poll_s=60.0)
    stream = RequestStream(client, card, "r1")
    client._streams["r1"] = stream
    assert not client.busy_polling
    client._on_batch(reply)
    assert client.busy_polling
    poller = client._poller
    assert poller is not None
    deadline = asyncio.get_running_loop().time() + 5
    assert (await stream.next(deadline)).token_ids == [5]
    assert client.busy_polling  # the request still waits for more
    stream.close()  # no request left: the poll ends
    await asyncio.wait_for(poller, 30)
    assert not client.busy_polling

    short = WorkerClient("nats://unused", "d", LoadTracker(), busy_poll_s=0.001)
    short._streams["r1"] = RequestStream(short, card, "r1")
    short._on_batch(reply)
    assert short._poller is not None
    await asyncio.wait_for(short._poller, 30)  # its time is up, the request still waits
    assert not short.busy_polling and short.in_flight == 1

    default = WorkerClient("nats://unused", "d", LoadTracker())
    default._streams["r1"] = RequestStream(default, card, "r1")
    default._on_batch(reply)
    assert not default.busy_polling


async def test_inbox_hands_items_over_in_order_and_survives_a_cancelled_reader() -> None:
    inbox = Inbox()
    assert inbox.empty()
    with pytest.raises(asyncio.QueueEmpty):
        inbox.get_nowait()
    reader = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    reader.cancel()  # a request cancelled while it waited (client gone, deadline)
    with pytest.raises(asyncio.CancelledError):
        await reader
    inbox.put_nowait("a")  # no error for the cancelled waiter; the item is kept
    inbox.put_nowait("b")
    assert not inbox.empty()
    assert await inbox.get() == "a"
    waiting = asyncio.ensure_future(inbox.get())
    assert await waiting == "b"
    late = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    assert not late.done()
    asyncio.get_running_loop().call_soon(inbox.put_nowait, "c")
    assert await asyncio.wait_for(late, 1) == "c"
    assert inbox.empty()


def _able(candidates: list[WorkerCard], request: GenerateRequest, *unsupported: Any) -> Any:
    """able_workers' outcome: the worker ids, or the error it raised."""
    try:
        return [c.worker_id for c in able_workers(candidates, request, *unsupported)]
    except errors.OpenAIError as exc:
        return (exc.status, exc.param, exc.message)


def test_able_workers_with_the_routable_workers_unsupported_set() -> None:
    """pick_worker hands able_workers the params some *routable* worker lacks (kept with the
    routable list), a superset of the candidates' own after exclusions: the same workers, or
    the same 400, as when it collects them from the candidates."""
    rng = random.Random(14)
    params = ["logprobs", "seed", "top_k", "min_p"]
    for _ in range(400):
        routable = [
            card(f"w{i}").model_copy(
                update={"unsupported_params": rng.sample(params, rng.randint(0, 2))}
            )
            for i in range(rng.randint(1, 5))
        ]
        superset = frozenset(n for c in routable for n in c.unsupported_params)
        candidates = [c for c in routable if rng.random() < 0.7] or routable[:1]
        sampling = SamplingParams(
            logprobs=rng.choice([None, 0, 2]), seed=rng.choice([None, 5]),
            top_k=rng.choice([0, 7]), min_p=rng.choice([0.0, 0.1]),
        )  # fmt: skip
        request = GenerateRequest(request_id="r", token_ids=[1], sampling=sampling)
        own = {n for c in candidates for n in c.unsupported_params}
        assert _able(candidates, request, superset) == _able(candidates, request, own)


def test_debug_loggers_set_only_the_named_loggers_to_debug() -> None:
    """HPCSERVE_DEBUG_LOGGERS: the KV router's decisions without everyone else's debug lines."""
    import logging

    from frontend.__main__ import debug_loggers

    names = ("frontend.kv_router", "frontend.timeline")
    saved = {name: logging.getLogger(name).level for name in (*names, "frontend.app")}
    try:
        assert debug_loggers(" frontend.kv_router,,frontend.timeline ") == list(names)
        for name in names:
            assert logging.getLogger(name).level == logging.DEBUG
        assert logging.getLogger("frontend.app").level == saved["frontend.app"]
        assert debug_loggers("") == []
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
