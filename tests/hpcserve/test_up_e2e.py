"""`hpcserve up` end to end: real etcd, NATS, torch worker and frontend, the official client.

One deployment for the whole module (start-up costs seconds); the SIGTERM test runs last.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from up_helpers import UpProcess, openai_client, processes_mentioning, started

from contract.processes import pid_alive

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    run_dir = tmp_path_factory.mktemp("up") / "run"
    with started(["configs/local-agg.yaml", "--set", "frontend.port=0"], run_dir) as process:
        yield process


@pytest.fixture(scope="module")
def client(up: UpProcess) -> openai.OpenAI:
    return openai_client(up)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_greedy_answer_names_paris(client: openai.OpenAI, model: str) -> None:
    response = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=30
    )
    assert "Paris" in response.choices[0].message.content
    assert response.usage.completion_tokens <= 30


def test_streaming_equals_non_streaming(client: openai.OpenAI, model: str) -> None:
    whole = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=30
    )
    pieces = []
    for chunk in client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=30, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == whole.choices[0].message.content


async def test_16_concurrent_requests_complete(up: UpProcess, model: str) -> None:
    client = openai.AsyncOpenAI(base_url=up.base_url, api_key="none", max_retries=0, timeout=300)
    prompts = [f"Count from {n} to {n + 5}." for n in range(16)]
    try:
        responses = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": p}], max_tokens=16,
                    temperature=0,
                )
                for p in prompts
            )
        )  # fmt: skip
    finally:
        await client.close()
    assert len(responses) == 16
    for response in responses:
        assert response.choices[0].finish_reason in ("stop", "length")
        assert response.usage.completion_tokens >= 1


def _assert_openai_error(body: object) -> dict:
    assert isinstance(body, dict) and "error" in body, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert "type" in error and "param" in error and "code" in error
    return error


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=5)
    assert info.value.status_code == 404
    _assert_openai_error(info.value.response.json())


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": QUESTION, "max_tokens": -1}, "max_tokens"),
        ({"messages": [], "max_tokens": 5}, "messages"),
        ({"messages": QUESTION, "max_tokens": 5, "temperature": 5.0}, "temperature"),
    ],
)
def test_bad_requests_are_400(client: openai.OpenAI, model: str, kwargs: dict, param: str):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, **kwargs)
    assert info.value.status_code == 400
    error = _assert_openai_error(info.value.response.json())
    assert error["param"] == param, error


def test_malformed_json_is_400(up: UpProcess) -> None:
    response = httpx.post(
        f"{up.base_url}/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400
    _assert_openai_error(response.json())


def test_sigterm_stops_everything(up: UpProcess) -> None:
    pids = up.pids()
    assert set(pids) == {"etcd", "nats", "worker-agg-g0-i0", "frontend"}
    assert all(pid_alive(pid) for pid in pids.values())
    up.popen.send_signal(signal.SIGTERM)
    assert up.finish(timeout_s=90) == 0, up.output
    assert [name for name, pid in pids.items() if pid_alive(pid)] == [], up.output
    assert processes_mentioning(str(up.run_dir)) == []
    logs = Path(up.run_dir) / "logs"
    assert {p.name for p in logs.iterdir()} >= {
        "etcd.log", "nats.log", "worker-agg-g0-i0.log", "frontend.log"
    }  # fmt: skip
    assert "[worker agg g0 i0 rank0]" in (logs / "worker-agg-g0-i0.log").read_text()
