"""Unit tests of a request's `n` choices (`frontend.choices`): the choices' engine requests,
reading them as one stream, following choice 0's worker, aborts and per-choice migration,
over a scripted in-process client (no NATS)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from test_migration import ScriptedClient, card, chunk, deadline, in_order_route

from contract.discovery import WorkerCard
from contract.messages import GenerateOutput, GenerateRequest, SamplingParams
from frontend.choices import ChoiceStreams, choice_requests
from frontend.errors import OpenAIError
from frontend.metrics import FrontendMetrics
from frontend.migration import MigratingStream
from frontend.prepared import Prompt
from frontend.serving import _route_for
from frontend.worker_client import RequestStream

PROMPT = [11, 12, 13, 14]


class PerSeedClient(ScriptedClient):
    """A ScriptedClient whose worker answers each seed of a first attempt with its own
    script (the choices of one request differ by seed), else with the worker's script. With
    `trickle`, chunks arrive one per event-loop turn, as over a network, not all at once."""

    def __init__(
        self,
        scripts: dict[str, list[GenerateOutput]],
        by_seed: dict[int, list[GenerateOutput]],
        trickle: bool = False,
    ) -> None:
        super().__init__(scripts)
        self.by_seed = by_seed
        self.trickle = trickle
        self._feeders: set[asyncio.Task[None]] = set()

    async def open(self, card: WorkerCard, request: GenerateRequest) -> Any:
        script = self.scripts[card.worker_id]
        seed = request.sampling.seed
        if seed in self.by_seed and len(request.token_ids) == len(PROMPT):
            script = self.by_seed[seed]
        stream = RequestStream(self, card, request.request_id)
        self._streams[request.request_id] = stream
        self._tracker.started(card.worker_id)
        self.opened.append((card.worker_id, request))
        payloads = [c.model_copy(update={"request_id": request.request_id}).model_dump_json()
                    .encode() for c in script]  # fmt: skip
        if not self.trickle:
            for payload in payloads:
                stream.queue.put_nowait(payload)
            return stream

        async def feed() -> None:
            for payload in payloads:
                await asyncio.sleep(0)
                stream.queue.put_nowait(payload)

        task = asyncio.get_running_loop().create_task(feed())
        self._feeders.add(task)
        task.add_done_callback(self._feeders.discard)
        return stream


def first_request(**sampling: Any) -> GenerateRequest:
    return GenerateRequest(
        request_id="c0", client_id="chatcmpl-1", token_ids=list(PROMPT),
        sampling=SamplingParams(max_tokens=10, **sampling),
    )  # fmt: skip


def choices_over(client: ScriptedClient, requests: list[GenerateRequest]) -> ChoiceStreams:
    route = in_order_route(client, [])
    return ChoiceStreams(
        [MigratingStream(client, route, r, limit=3, metrics=FrontendMetrics()) for r in requests]
    )


async def read_all(choices: ChoiceStreams) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {i: [] for i in range(choices.n)}
    left = choices.n
    while left:
        index, output = await choices.next(deadline())
        tokens[index].extend(output.token_ids)
        left -= output.finish_reason is not None
    return tokens


def test_choice_i_samples_with_seed_plus_i_and_its_own_id() -> None:
    requests = choice_requests(first_request(seed=100, temperature=0.7), 4)
    assert [r.sampling.seed for r in requests] == [100, 101, 102, 103]
    assert [r.choice_index for r in requests] == [0, 1, 2, 3]
    assert len({r.request_id for r in requests}) == 4
    assert {r.client_id for r in requests} == {"chatcmpl-1"}
    assert all(r.token_ids == PROMPT and r.sampling.temperature == 0.7 for r in requests)
    assert all(r.sampling.max_tokens == 10 for r in requests)
    unseeded = choice_requests(first_request(temperature=0.0), 3)
    assert [r.sampling.seed for r in unseeded] == [None, None, None]
    assert unseeded[1].sampling is not unseeded[0].sampling  # each has its own budget
    assert [r.choice_index for r in unseeded] == [0, 1, 2]
    top = 2**63 - 1  # the largest seed a request may give: its other choices wrap around
    assert [r.sampling.seed for r in choice_requests(first_request(seed=top), 2)] == [top, -(2**63)]
    assert choice_requests(first_request(), 1) == [first_request()]


async def test_choices_stream_as_one_with_their_indices() -> None:
    client = PerSeedClient(
        {"a": []},
        {
            5: [chunk(1), chunk(2), chunk(3, finish="stop")],
            6: [chunk(7, 8), chunk(9, finish="length")],
            7: [chunk(4, finish="stop")],
        },
    )
    choices = choices_over(client, choice_requests(first_request(seed=5), 3))
    await choices.start(deadline())
    assert await read_all(choices) == {0: [1, 2, 3], 1: [7, 8, 9], 2: [4]}
    choices.close()
    assert [w for w, _ in client.opened] == ["a", "a", "a"]
    assert client.aborts == []  # every choice finished on its own: nothing to abort
    assert client.in_flight == 0 and not client.tracker.in_flight


async def test_a_failing_choice_aborts_the_others() -> None:
    client = PerSeedClient(
        {"a": []},
        {
            1: [chunk(1)],  # then nothing: still running when choice 1 fails
            2: [chunk(2), GenerateOutput(request_id="x", finish_reason="error", error="boom")],
            3: [chunk(3)],
        },
    )
    requests = choice_requests(first_request(seed=1), 3)
    choices = choices_over(client, requests)
    with pytest.raises(OpenAIError) as info:  # while starting or after: either way
        await choices.start(deadline())
        while True:
            await choices.next(deadline())
    assert info.value.status == 500 and "boom" in info.value.message
    choices.close()
    aborted = {rid for _, rid in client.aborts}
    assert aborted == {requests[0].request_id, requests[2].request_id}
    assert client.in_flight == 0


async def test_the_start_waits_for_the_first_chunk_of_any_choice_only() -> None:
    """A stream starts with the first token to come: choice 0 still silent, choice 2's
    chunk starts it."""
    client = PerSeedClient({"a": []}, {1: [], 2: [], 3: [chunk(7)]})
    choices = choices_over(client, choice_requests(first_request(seed=1), 3))
    await choices.start(deadline())
    index, output = await choices.next(deadline())
    assert (index, output.token_ids) == (2, chunk(7).token_ids)
    choices.close()
    assert client.in_flight == 0


async def test_a_worker_error_in_a_later_choice_fails_the_reading_and_aborts_all() -> None:
    """Choice 1's refusal comes after choice 0's first chunk started the stream: raised by
    `next` (a stream's error event), never lost."""
    client = PerSeedClient(
        {"a": [chunk(1)]},
        {9: [GenerateOutput(request_id="x", finish_reason="error", error="bad seed",
                            error_param="seed")]},
    )  # fmt: skip
    requests = choice_requests(first_request(seed=8), 3)  # choice 1 has seed 9
    choices = choices_over(client, requests)
    with pytest.raises(OpenAIError) as info:
        await choices.start(deadline())
        while True:
            await choices.next(deadline())
    choices.close()
    assert (info.value.status, info.value.param) == (400, "seed")
    assert {rid for _, rid in client.aborts} == {requests[0].request_id, requests[2].request_id}
    assert client.in_flight == 0


async def test_a_finished_choice_is_aborted_alone_and_its_late_chunks_dropped() -> None:
    client = PerSeedClient(
        {"a": []}, {1: [chunk(1), chunk(2), chunk(3)], 2: [chunk(4), chunk(5, finish="stop")]}
    )
    requests = choice_requests(first_request(seed=1), 2)
    choices = choices_over(client, requests)
    await choices.start(deadline())
    seen: list[tuple[int, list[int]]] = []
    while True:
        index, output = await choices.next(deadline())
        seen.append((index, output.token_ids))
        if index == 0:  # a stop string in choice 0's first chunk: it needs no more
            choices.finish(0)
        if output.finish_reason is not None:
            break
    assert [tokens for index, tokens in seen if index == 0] == [[1]]
    assert [tokens for index, tokens in seen if index == 1] == [[4], [5]]
    assert client.aborts == [("a.abort", requests[0].request_id)]
    choices.close()
    assert client.in_flight == 0


async def test_a_lost_worker_migrates_each_choice_with_its_own_tokens() -> None:
    client = PerSeedClient(
        {"a": [], "b": [chunk(30, finish="length")]},
        {1: [chunk(1), chunk(2)], 2: [chunk(3)]},  # then worker a dies
    )
    requests = choice_requests(first_request(seed=1, temperature=0.0), 2)
    choices = choices_over(client, requests)
    await choices.start(deadline())
    got: dict[int, list[int]] = {0: [], 1: []}
    while len(got[0]) + len(got[1]) < 3:
        index, output = await choices.next(deadline())
        got[index].extend(output.token_ids)
    client.leave("a")
    rest = await read_all_left(choices, got)
    assert rest == {0: [1, 2, 30], 1: [3, 30]}
    resumed = {r.sampling.seed: r for w, r in client.opened if w == "b"}
    assert resumed[1].token_ids == [*PROMPT, 1, 2] and resumed[1].sampling.max_tokens == 8
    assert resumed[2].token_ids == [*PROMPT, 3] and resumed[2].sampling.max_tokens == 9
    assert [s.migrations for s in choices.streams] == [1, 1]
    choices.close()


async def read_all_left(choices: ChoiceStreams, got: dict[int, list[int]]) -> dict[int, list[int]]:
    left = 2
    while left:
        index, output = await choices.next(deadline())
        got[index].extend(output.token_ids)
        left -= output.finish_reason is not None
    return got


async def test_a_timeout_in_any_choice_is_raised() -> None:
    client = PerSeedClient({"a": []}, {1: [chunk(1)], 2: [chunk(2)]})
    choices = choices_over(client, choice_requests(first_request(seed=1), 2))
    await choices.start(deadline())
    await choices.next(deadline())
    await choices.next(deadline())
    with pytest.raises(TimeoutError):
        await choices.next(asyncio.get_running_loop().time() + 0.05)
    choices.close()
    assert len(client.aborts) == 2


# ---- following choice 0's worker (serving's routing) --------------------------------------


class FakeState:
    """What `_route_for` reads of the frontend state: candidates and the router's pick."""

    def __init__(self, cards: list[WorkerCard]) -> None:
        self.cards = cards
        self.picks = 0

    def candidates(self, exclude: set[str]) -> list[WorkerCard]:
        return [c for c in self.cards if c.instance not in exclude]

    async def pick_worker(
        self, request: GenerateRequest, exclude: set[str], asked_as: Any = None
    ) -> WorkerCard:
        self.picks += 1  # round robin over the candidates
        candidates = self.candidates(exclude)
        return candidates[self.picks % len(candidates)]


async def test_the_other_choices_follow_choice_0_to_its_worker() -> None:
    cards = [card("a"), card("b"), card("c")]
    state = FakeState(cards)
    prompt = Prompt(list(PROMPT), "prompt")
    followed = SimpleNamespace(opened=True, card=cards[1])
    route = _route_for(state, SimpleNamespace(tools=None), prompt, checked=True,
                       follow=followed)  # type: ignore[arg-type]
    assert (await route(first_request(), set())).worker_id == "b"
    assert state.picks == 0  # the router was not asked
    # a continuation (prompt + tokens) is routed afresh, so is one excluding that worker
    later = first_request().model_copy(update={"token_ids": [*PROMPT, 1]})
    await route(later, set())
    assert state.picks == 1
    assert (await route(first_request(), {"b-1"})).worker_id != "b"
    # a worker that left the candidates (draining, gone) is not followed
    state.cards = [cards[0], cards[2]]
    assert (await route(first_request(), set())).worker_id in ("a", "c")
