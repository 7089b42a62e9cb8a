"""Unit tests of request migration (`frontend.migration`): the continuation request, the
attempt loop over a scripted in-process client (no NATS), limits, accounting and usage."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from worker_cards import worker_card

from contract.discovery import WorkerCard
from contract.messages import (
    AbortRequest,
    GenerateOutput,
    GenerateRequest,
    GuidedDecoding,
    SamplingParams,
)
from frontend import errors
from frontend.errors import OpenAIError
from frontend.metrics import FrontendMetrics
from frontend.migration import MigratingStream, continuation
from frontend.prepared import Prompt
from frontend.responses import Generation
from frontend.router import LoadTracker
from frontend.tokenization import TextTokenizer
from frontend.worker_client import NotListening, RequestStream, WorkerClient

PROMPT = [11, 12, 13, 14]


def card(worker_id: str) -> WorkerCard:
    return worker_card(worker_id, subject=f"{worker_id}.gen", abort_subject=f"{worker_id}.abort",
                       instance=f"{worker_id}-1")  # fmt: skip


def request(max_tokens: int = 10, **sampling: Any) -> GenerateRequest:
    return GenerateRequest(
        request_id="first",
        token_ids=list(PROMPT),
        sampling=SamplingParams(max_tokens=max_tokens, **sampling),
    )


# ---- the continuation request ----------------------------------------------------------


def test_continuation_appends_the_tokens_and_shrinks_the_budget() -> None:
    original = request(
        max_tokens=10, temperature=0.0, top_k=5, seed=7, logprobs=2, stop_token_ids=[2],
        ignore_eos=False, repetition_penalty=1.1,
    )  # fmt: skip
    before = original.model_dump()
    resumed = continuation(original, [21, 22, 23])
    assert resumed.token_ids == [*PROMPT, 21, 22, 23]
    assert resumed.sampling.max_tokens == 7
    others = {k: v for k, v in resumed.sampling.model_dump().items() if k != "max_tokens"}
    assert others == {k: v for k, v in before["sampling"].items() if k != "max_tokens"}
    assert resumed.request_id != original.request_id  # replies are keyed by request id
    assert original.model_dump() == before  # the original is left alone
    second_choice = original.model_copy(update={"choice_index": 2})
    assert continuation(second_choice, [21]).choice_index == 2  # it stays that choice


def test_continuation_shrinks_min_tokens_by_the_tokens_made() -> None:
    """min_tokens counts the client's tokens: those made before the loss count toward it."""
    original = request(max_tokens=10, min_tokens=5, logit_bias={7: 3.0})
    resumed = continuation(original, [21, 22, 23])
    assert resumed.sampling.min_tokens == 2 and resumed.sampling.max_tokens == 7
    assert resumed.sampling.logit_bias == {7: 3.0}
    assert continuation(resumed, [24, 25, 26]).sampling.min_tokens == 0


def test_continuation_counts_the_constrained_output_already_made() -> None:
    """The new attempt's matcher must consume the produced tokens (now the prompt's tail)
    before it constrains the next one: `guided.generated` counts them, over attempts."""
    original = request(guided=GuidedDecoding(kind="json_object"))
    resumed = continuation(original, [21, 22, 23])
    assert resumed.sampling.guided == GuidedDecoding(kind="json_object", generated=3)
    assert original.sampling.guided is not None and original.sampling.guided.generated == 0
    again = continuation(resumed, [24])
    assert again.sampling.guided is not None and again.sampling.guided.generated == 4
    assert continuation(request(), [21]).sampling.guided is None


def test_continuation_of_a_continuation_and_of_nothing() -> None:
    once = continuation(request(max_tokens=10), [21, 22])
    twice = continuation(once, [23])
    assert twice.token_ids == [*PROMPT, 21, 22, 23] and twice.sampling.max_tokens == 7
    retry = continuation(request(max_tokens=10), [])
    assert retry.token_ids == PROMPT and retry.sampling.max_tokens == 10
    assert len({once.request_id, twice.request_id, retry.request_id}) == 3


def test_continuation_asks_for_the_prompt_logprobs_only_before_any_token() -> None:
    """They come with the first token's chunk: a retry before it needs them, one after not."""
    original = request(max_tokens=10, prompt_logprobs=1)
    assert continuation(original, []).sampling.prompt_logprobs == 1
    assert continuation(original, [21]).sampling.prompt_logprobs is None


# ---- the attempt loop over a scripted client -------------------------------------------


class ScriptedClient(WorkerClient):
    """A WorkerClient without NATS: `open` registers the reply queue (with the real tracker
    bookkeeping) and queues the worker's scripted chunks; published aborts are recorded."""

    def __init__(self, scripts: dict[str, list[GenerateOutput]]) -> None:
        super().__init__("nats://unused", "test", LoadTracker())
        self.scripts = scripts
        self.opened: list[tuple[str, GenerateRequest]] = []
        self.aborts: list[tuple[str, str]] = []
        self.finished_ids: list[str] = []
        self._tracker.finish_listeners.append(self.finished_ids.append)
        self.on_workers_changed({worker_id: card(worker_id) for worker_id in scripts})

    @property
    def tracker(self) -> LoadTracker:
        return self._tracker

    async def open(self, card: WorkerCard, request: GenerateRequest) -> RequestStream:
        stream = RequestStream(self, card, request.request_id)
        self._streams[request.request_id] = stream
        self._tracker.started(card.worker_id)
        self.opened.append((card.worker_id, request))
        for chunk in self.scripts[card.worker_id]:
            chunk = chunk.model_copy(update={"request_id": request.request_id})
            stream.queue.put_nowait(chunk.model_dump_json().encode())
        return stream

    def _publish_soon(self, subject: str, payload: bytes) -> None:
        self.aborts.append((subject, AbortRequest.model_validate_json(payload).request_id))

    def leave(self, worker_id: str) -> None:
        """The directory lost `worker_id` (lease lapsed or revoked)."""
        self.on_workers_changed({w: c for w, c in self._workers.items() if w != worker_id})


def chunk(*tokens: int, finish: str | None = None, prompt: int = 0, cached: int = 0) -> Any:
    return GenerateOutput(
        request_id="x", token_ids=list(tokens), finish_reason=finish,  # type: ignore[arg-type]
        num_prompt_tokens=prompt, num_cached_tokens=cached,
    )  # fmt: skip


def in_order_route(client: ScriptedClient, calls: list[set[str]]) -> Any:
    """Route to the first worker (by id) still registered and not excluded; 503 if none."""

    async def route(req: GenerateRequest, exclude: set[str]) -> WorkerCard:
        calls.append(set(exclude))
        for worker_id in sorted(client._workers):
            if client._workers[worker_id].instance not in exclude:
                return client._workers[worker_id]
        raise errors.no_worker("no worker is available: none left")

    return route


def deadline() -> float:
    return asyncio.get_running_loop().time() + 5


async def drain(stream: MigratingStream, lose: dict[int, str] | None = None) -> list[Any]:
    """Every chunk up to the final one; after the n-th chunk, the worker in `lose[n]` leaves."""
    outputs = []
    lose = lose or {}
    while True:
        output = await stream.next(deadline())
        outputs.append(output)
        if len(outputs) in lose:
            stream._client.leave(lose[len(outputs)])  # type: ignore[attr-defined]
        if output.finish_reason is not None:
            return outputs


def tokens(outputs: list[GenerateOutput]) -> list[int]:
    return [t for output in outputs for t in output.token_ids]


async def test_a_lost_worker_hands_the_request_on_with_prompt_plus_tokens() -> None:
    client = ScriptedClient(
        {
            "a": [chunk(21, 22, prompt=4, cached=2), chunk(23, prompt=4, cached=2)],  # then dies
            "b": [chunk(24, prompt=7, cached=5), chunk(25, 26, finish="stop", prompt=7)],
        }
    )
    metrics = FrontendMetrics()
    calls: list[set[str]] = []
    stream = MigratingStream(
        client, in_order_route(client, calls), request(max_tokens=10), limit=3, metrics=metrics
    )
    outputs = await drain(stream, lose={2: "a"})
    stream.close()

    assert tokens(outputs) == [21, 22, 23, 24, 25, 26]
    assert [w for w, _ in client.opened] == ["a", "b"] and calls == [set(), {"a-1"}]
    resumed = client.opened[1][1]
    assert resumed.token_ids == [*PROMPT, 21, 22, 23] and resumed.sampling.max_tokens == 7
    # the continuation's chunks report the request's prompt and the first attempt's cache
    assert [(o.num_prompt_tokens, o.num_cached_tokens) for o in outputs[2:]] == [(4, 2), (4, 2)]
    assert stream.migrations == 1 and stream.generated == 6 and stream.card.worker_id == "b"
    assert metrics.migrations.labels("migrated")._value.get() == 1
    assert metrics.migrations.labels("exhausted")._value.get() == 0
    # both attempts released (the router's in-flight entries), the lost one also aborted
    # (a draining worker stops; the finished one is not)
    assert client.in_flight == 0 and not client.tracker.in_flight
    assert client.finished_ids == ["first", resumed.request_id]
    assert client.aborts == [("a.abort", "first")]


async def test_a_nats_reconnect_continues_on_the_same_worker() -> None:
    """Chunks sent while NATS reconnected may be gone: the request continues afresh, and the
    worker (not at fault) stays eligible."""
    client = ScriptedClient({"a": [chunk(21, 22)]})  # each attempt replays this script
    calls: list[set[str]] = []
    stream = MigratingStream(
        client, in_order_route(client, calls), request(max_tokens=5), limit=3,
        metrics=FrontendMetrics(),
    )  # fmt: skip
    assert (await stream.next(deadline())).token_ids == [21, 22]
    await client._on_reconnected()
    resumed = await stream.next(deadline())
    assert resumed.token_ids == [21, 22]  # the fresh attempt's first chunk
    assert [w for w, _ in client.opened] == ["a", "a"] and calls == [set(), set()]
    assert client.opened[1][1].token_ids == [*PROMPT, 21, 22]
    assert client.opened[1][1].sampling.max_tokens == 3
    stream.close()


async def test_an_attempt_nobody_heard_is_routed_again_without_excluding() -> None:
    """NATS "no responders" (a worker re-subscribing after a NATS restart): the attempt is
    sent again after a short backoff, to the same worker if the router says so."""

    class DeafOnce(ScriptedClient):
        async def open(self, card: WorkerCard, request: GenerateRequest) -> RequestStream:
            stream = await super().open(card, request)
            if len(self.opened) == 1:  # the first attempt was never heard
                while not stream.queue.empty():
                    stream.queue.get_nowait()
                stream.queue.put_nowait(NotListening(card.worker_id))
            return stream

    client = DeafOnce({"a": [chunk(21, 22), chunk(23, finish="length")]})
    calls: list[set[str]] = []
    stream = MigratingStream(
        client, in_order_route(client, calls), request(max_tokens=3), limit=0,
        metrics=FrontendMetrics(),
    )  # fmt: skip
    outputs = await drain(stream)
    stream.close()
    assert tokens(outputs) == [21, 22, 23]
    assert [w for w, _ in client.opened] == ["a", "a"] and calls == [set(), set()]
    assert stream.migrations == 0  # limit 0 and still served: not a migration


async def test_the_migration_limit_ends_in_a_503() -> None:
    client = ScriptedClient({"a": [chunk(21)], "b": [chunk(22)], "c": [chunk(23)]})
    metrics = FrontendMetrics()
    calls: list[set[str]] = []
    stream = MigratingStream(
        client, in_order_route(client, calls), request(), limit=1, metrics=metrics
    )
    assert (await stream.next(deadline())).token_ids == [21]
    client.leave("a")
    assert (await stream.next(deadline())).token_ids == [22]  # migrated to b
    client.leave("b")
    with pytest.raises(OpenAIError) as info:
        await stream.next(deadline())  # c is up, but the limit is spent
    stream.close()
    error = info.value
    assert error.status == 503 and error.type == "service_unavailable" and error.param is None
    assert "worker b left" in error.message and "migration_limit is 1" in error.message
    assert [w for w, _ in client.opened] == ["a", "b"]
    assert metrics.migrations.labels("migrated")._value.get() == 1
    assert metrics.migrations.labels("exhausted")._value.get() == 1
    assert client.in_flight == 0 and not client.tracker.in_flight


async def test_limit_zero_fails_at_once_but_still_retries_before_the_first_token() -> None:
    client = ScriptedClient({"a": [], "b": [chunk(21)], "c": [chunk(30)]})
    metrics = FrontendMetrics()
    calls: list[set[str]] = []
    stream = MigratingStream(
        client, in_order_route(client, calls), request(), limit=0, metrics=metrics
    )
    first = asyncio.create_task(stream.next(deadline()))
    await asyncio.sleep(0.01)
    client.leave("a")  # silent a dies before any token: a plain retry, as always
    assert (await first).token_ids == [21]
    assert client.opened[1][1].token_ids == PROMPT and stream.migrations == 0
    client.leave("b")
    with pytest.raises(OpenAIError) as info:
        await stream.next(deadline())
    stream.close()
    assert info.value.status == 503 and "migration_limit is 0" in info.value.message
    assert [w for w, _ in client.opened] == ["a", "b"]
    assert metrics.migrations.labels("exhausted")._value.get() == 1


async def test_no_worker_left_is_a_503_not_a_hang() -> None:
    client = ScriptedClient({"a": [chunk(21)]})
    metrics = FrontendMetrics()
    calls: list[set[str]] = []
    stream = MigratingStream(
        client, in_order_route(client, calls), request(), limit=3, metrics=metrics
    )
    await stream.next(deadline())
    client.leave("a")
    async with asyncio.timeout(2):
        with pytest.raises(OpenAIError) as info:
            await stream.next(deadline())
    stream.close()
    assert info.value.status == 503 and info.value.code == "no_worker_available"
    assert "worker a left" in info.value.message and "could not move" in info.value.message
    assert metrics.migrations.labels("exhausted")._value.get() == 1
    assert metrics.migrations.labels("migrated")._value.get() == 0
    assert client.in_flight == 0 and not client.tracker.in_flight


async def test_an_attempt_that_used_its_whole_budget_just_finishes() -> None:
    client = ScriptedClient({"a": [chunk(21, 22), chunk(23)], "b": [chunk(99)]})
    metrics = FrontendMetrics()
    stream = MigratingStream(
        client, in_order_route(client, []), request(max_tokens=3), limit=0, metrics=metrics
    )
    outputs = await drain(stream, lose={2: "a"})  # every token came, the finish did not
    stream.close()
    assert tokens(outputs) == [21, 22, 23]
    assert outputs[-1].finish_reason == "length" and not outputs[-1].token_ids
    assert [w for w, _ in client.opened] == ["a"]  # nothing left to ask another worker
    assert stream.migrations == 0  # not a migration: even limit 0 finishes it
    assert metrics.migrations.labels("migrated")._value.get() == 0
    assert metrics.migrations.labels("exhausted")._value.get() == 0


async def test_a_worker_error_reply_is_not_migrated() -> None:
    client = ScriptedClient(
        {"a": [chunk(21), GenerateOutput(request_id="x", finish_reason="error", error="boom")]}
    )
    stream = MigratingStream(
        client, in_order_route(client, []), request(), limit=3, metrics=FrontendMetrics()
    )
    outputs = await drain(stream)
    stream.close()
    assert outputs[-1].finish_reason == "error" and stream.migrations == 0
    assert len(client.opened) == 1


async def test_usage_text_and_stop_strings_continue_across_a_migration(
    tokenizer: TextTokenizer,
) -> None:
    """Through the app's Generation: the text is the decode of every token, the stop string
    is found across the two attempts' tokens, usage counts the original prompt."""
    prompt = tokenizer.encode("Tell me", add_special_tokens=False)
    ids = tokenizer.encode(" a story about the sea. THE END and more", add_special_tokens=False)
    cut = len(tokenizer.encode(" a story about", add_special_tokens=False))
    client = ScriptedClient(
        {
            "a": [chunk(*ids[:cut], prompt=len(prompt), cached=3)],
            "b": [chunk(*ids[cut:], finish="length", prompt=len(prompt) + cut)],
        }
    )
    first = GenerateRequest(
        request_id="first", token_ids=prompt, sampling=SamplingParams(max_tokens=len(ids))
    )
    metrics = FrontendMetrics()
    stream = MigratingStream(client, in_order_route(client, []), first, limit=3, metrics=metrics)
    prepared = SimpleNamespace(
        prompts=[Prompt(prompt, "prompt")], stops=["THE END"], arrival=time.perf_counter(),
        prompt_only=False, reasoning=None,
        sampling=first.sampling,
    )
    generation = Generation(SimpleNamespace(tokenizer=tokenizer, metrics=metrics), prepared)  # type: ignore[arg-type]
    text = ""
    outputs = await drain(stream, lose={1: "a"})
    stream.close()
    for output in outputs:
        text += generation.consume(output)[0]
    assert client.opened[1][1].token_ids == [*prompt, *ids[:cut]]
    assert text == " a story about the sea. "
    assert generation.finish_reason == "stop"
    assert generation.usage() == {
        "prompt_tokens": len(prompt),
        "completion_tokens": len(ids),
        "total_tokens": len(prompt) + len(ids),
        "prompt_tokens_details": {"cached_tokens": 3},
    }
