"""`n` choices end to end: `hpcserve up` of the default model (real etcd, NATS, torch worker,
frontend) and the official client. Greedy choices are identical, seeded ones differ and are
reproducible (choice i samples with seed + i), usage counts the prompt once, limits are 400s,
and the prompt of an n-request is prefilled once (the engine's prefix-cache hits, as the
frontend's /metrics counts them per choice).

One deployment for the whole module.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest
from up_helpers import UpProcess, openai_client, started

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "Name a colour."}]
BLOCK_SIZE = 16  # configs/local-agg.yaml engine.block_size


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    run_dir = tmp_path_factory.mktemp("n-choices") / "run"
    with started(["configs/local-agg.yaml", "--set", "frontend.port=0"], run_dir) as process:
        yield process


@pytest.fixture(scope="module")
def client(up: UpProcess) -> openai.OpenAI:
    return openai_client(up)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_greedy_choices_are_identical_and_usage_counts_the_prompt_once(
    client: openai.OpenAI, model: str
) -> None:
    one = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=12
    )
    three = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=12, n=3
    )
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert {c.finish_reason for c in three.choices} == {one.choices[0].finish_reason}
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.total_tokens == three.usage.prompt_tokens + three.usage.completion_tokens


def test_seeded_choices_differ_and_choice_i_uses_seed_plus_i(
    client: openai.OpenAI, model: str
) -> None:
    def texts(**kwargs: object) -> list[str]:
        response = client.completions.create(
            model=model, prompt="My favourite animal is", max_tokens=10, temperature=1.0,
            **kwargs,
        )  # fmt: skip
        return [c.text for c in sorted(response.choices, key=lambda c: c.index)]

    choices = texts(n=4, seed=1234)
    assert len(set(choices)) >= 3  # different seeds sample differently
    assert texts(n=4, seed=1234) == choices  # reproducible
    assert texts(seed=1236) == [choices[2]]  # choice 2 sampled with seed 1234 + 2


def test_streamed_choices_interleave_and_match_the_whole_response(
    client: openai.OpenAI, model: str
) -> None:
    kwargs = dict(model=model, prompt="The sea is", max_tokens=8, temperature=0.8, seed=7, n=3)
    whole = client.completions.create(**kwargs)
    texts = {0: "", 1: "", 2: ""}
    finishes: dict[int, str] = {}
    order: list[int] = []
    usage = None
    done = 0
    for chunk in client.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    ):
        for choice in chunk.choices:
            order.append(choice.index)
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
                done += 1
        if chunk.usage is not None:
            assert done == 3  # the usage chunk comes after every choice finished
            usage = chunk.usage
    assert texts == {c.index: c.text for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert order != sorted(order)  # the choices' chunks interleave as tokens arrive
    assert usage is not None and usage.model_dump() == whole.usage.model_dump()


def test_max_tokens_stops_and_logprobs_apply_per_choice(client: openai.OpenAI, model: str) -> None:
    response = client.completions.create(
        model=model, prompt="List: one, two,", max_tokens=6, temperature=1.0, seed=99, n=3,
        logprobs=1, stop=[","],
    )  # fmt: skip
    lengths = []
    for choice in response.choices:
        tokens = choice.logprobs.tokens
        assert 1 <= len(tokens) <= 6 and "," not in choice.text
        if choice.finish_reason == "length":
            assert len(tokens) == 6
        lengths.append(len(tokens))
    assert response.usage.completion_tokens >= sum(lengths) - 3  # a stop string's own token
    assert response.usage.completion_tokens <= 18


@pytest.mark.parametrize("n", [0, 17])
def test_n_out_of_range_is_400_naming_n(client: openai.OpenAI, model: str, n: int) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, n=n)
    error = info.value.response.json()["error"]
    assert error["param"] == "n" and error["type"] == "invalid_request_error", error


def _cached_prompt_tokens(up: UpProcess) -> float:
    text = httpx.get(up.base_url.removesuffix("/v1") + "/metrics", timeout=30).text
    match = re.search(r"^hpcserve_frontend_cached_prompt_tokens_total (\S+)$", text, re.M)
    assert match, text
    return float(match.group(1))


def test_the_prompt_is_prefilled_once_per_n_request(
    up: UpProcess, client: openai.OpenAI, model: str
) -> None:
    """A prompt no request sent before (its first block is new): choice 0 computes it, the
    other choices take every full block of it from the prefix cache."""
    prompt = f"[{uuid.uuid4().hex}] " + "Write a short poem about the moon and the tides. " * 4
    before = _cached_prompt_tokens(up)
    response = client.completions.create(
        model=model, prompt=prompt, max_tokens=4, temperature=0.9, seed=5, n=4
    )
    assert len(response.choices) == 4
    cacheable = (response.usage.prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert cacheable >= 3 * BLOCK_SIZE
    assert response.usage.prompt_tokens_details is None  # not cached for the request itself
    assert _cached_prompt_tokens(up) - before == 3 * cacheable
