"""Request migration through the real app, etcd and nats-server, with FAKE workers that
continue a fixed token script from wherever the request's tokens leave off: a worker leaves
mid-request and the client's stream or response goes on with no error and no token lost or
repeated; with no worker left the client gets a clear 503 (a stream: an error event)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest

from contract.bus import abort_subject, connect, worker_subject
from contract.discovery import WorkerCard, WorkerRegistration
from contract.messages import (
    AbortRequest,
    GenerateOutput,
    GenerateRequest,
    TokenLogprob,
)
from frontend.tokenization import TextTokenizer

pytestmark = pytest.mark.integration

PROMPT = [1, 2, 3, 4, 5]
STORY = (
    "Once upon a time, a small robot 🤖 lived by the sea. Every morning it counted the "
    "waves, wrote their names in the sand (海 means sea), and waited for the tide."
)


class ScriptWorker:
    """A FAKE worker: answers a request whose tokens are PROMPT + script[:k] with
    script[k:k + max_tokens], one token per chunk, `delay_s` apart; honours aborts."""

    def __init__(self, fe: Any, worker_id: str, script: list[int], delay_s: float) -> None:
        self.fe = fe
        self.worker_id = worker_id
        self.script = script
        self.delay_s = delay_s
        self.requests: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.sent: dict[str, int] = {}  # tokens published, by request id
        self._nc: Any = None
        self._registration: WorkerRegistration | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> ScriptWorker:
        deployment = self.fe.config.name
        card = WorkerCard(
            worker_id=self.worker_id, role="agg", model="fake", block_size=16,
            subject=worker_subject(deployment, self.worker_id),
            abort_subject=abort_subject(deployment, self.worker_id),
            capacity=8, max_model_len=4096, engine="fake",
        )  # fmt: skip
        self._nc = await connect(self.fe.nats_url, f"script-{self.worker_id}")
        await self._nc.subscribe(card.subject, cb=self._on_generate)
        await self._nc.subscribe(card.abort_subject, cb=self._on_abort)
        await self._nc.flush()
        self._registration = WorkerRegistration(self.fe.etcd_endpoint, deployment, card, ttl_s=5)
        await self._registration.open()
        await self.fe.wait_for_workers(lambda ids: self.worker_id in ids)
        return self

    async def leave(self) -> None:
        """Revoke the lease (as a crash's lapse, or a drain, looks to the frontend)."""
        if self._registration is not None:
            await self._registration.close()
            self._registration = None

    async def stop(self) -> None:
        await self.leave()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self._nc.close()

    async def _on_abort(self, msg: Any) -> None:
        self.aborted.append(AbortRequest.model_validate_json(msg.data).request_id)

    async def _on_generate(self, msg: Any) -> None:
        request = GenerateRequest.model_validate_json(msg.data)
        self.requests.append(request)
        task = asyncio.get_running_loop().create_task(self._answer(request, msg.reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, request: GenerateRequest, reply: str) -> None:
        done = request.token_ids[len(PROMPT) :]
        assert request.token_ids[: len(PROMPT)] == PROMPT and done == self.script[: len(done)]
        budget = request.sampling.max_tokens
        for i in range(budget):
            await asyncio.sleep(self.delay_s)
            if request.request_id in self.aborted:
                return
            token = self.script[len(done) + i]
            logprobs = None
            if request.sampling.logprobs is not None:
                logprobs = [TokenLogprob(token_id=token, logprob=-0.5)]
            out = GenerateOutput(
                request_id=request.request_id,
                token_ids=[token],
                logprobs=logprobs,
                finish_reason="length" if i == budget - 1 else None,
                num_prompt_tokens=len(request.token_ids),
            )
            await self._nc.publish(reply, out.model_dump_json().encode())
            self.sent[request.request_id] = self.sent.get(request.request_id, 0) + 1

    def sent_for(self, index: int) -> int:
        """Tokens published for the `index`-th request this worker received."""
        if len(self.requests) <= index:
            return 0
        return self.sent.get(self.requests[index].request_id, 0)


@pytest.fixture
def script(tokenizer: TextTokenizer) -> list[int]:
    return tokenizer.encode(STORY, add_special_tokens=False)


async def add(fe: Any, worker_id: str, script: list[int], delay_s: float) -> ScriptWorker:
    worker = await ScriptWorker(fe, worker_id, script, delay_s).start()
    fe.workers.append(worker)  # stopped by the fixture
    return worker


def migrations(text: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith("hpcserve_frontend_migrations_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('"')[1]] = float(value)
    return found


async def wait_until(predicate: Any, timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_stream_continues_on_another_worker(
    make_frontend: Any, script: list[int], tokenizer: TextTokenizer
) -> None:
    fe = await make_frontend()
    first = await add(fe, "a-first", script, delay_s=0.03)
    body = {
        "model": "smol", "prompt": PROMPT, "max_tokens": len(script), "stream": True,
        "logprobs": 0, "stream_options": {"include_usage": True},
    }  # fmt: skip
    async with fe.client() as client:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            collected = [await anext(lines)]
            await wait_until(lambda: first.sent_for(0) >= 10)
            second = await add(fe, "b-second", script, delay_s=0.005)
            await first.leave()  # the frontend sees it go; it keeps sending until aborted
            collected += [line async for line in lines if line]
        events = [json.loads(line[6:]) for line in collected if line.startswith("data: {")]
        assert collected[-1] == "data: [DONE]"
        assert not [e for e in events if "error" in e], events
        text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
        assert text == tokenizer.decode(script)
        logprob_tokens = [
            t for e in events if e["choices"] and e["choices"][0]["logprobs"]
            for t in e["choices"][0]["logprobs"]["tokens"]
        ]  # fmt: skip
        assert len(logprob_tokens) == len(script)
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
        assert events[-1]["usage"] == {
            "prompt_tokens": len(PROMPT),
            "completion_tokens": len(script),
            "total_tokens": len(PROMPT) + len(script),
        }
        # the continuation: the prompt plus what the first worker had delivered
        (resumed,) = second.requests
        k = len(resumed.token_ids) - len(PROMPT)
        assert k >= 10 and resumed.token_ids == PROMPT + script[:k]
        assert resumed.sampling.max_tokens == len(script) - k
        assert resumed.sampling.logprobs == 0
        await wait_until(lambda: first.aborted == [first.requests[0].request_id])
        metrics = (await client.get("/metrics")).text
        assert migrations(metrics) == {"migrated": 1.0, "exhausted": 0.0}
        state = fe.app.state.frontend
        await wait_until(lambda: not state.client.in_flight and not state.tracker.in_flight)


async def test_non_stream_continues_then_503_when_no_worker_is_left(
    make_frontend: Any, script: list[int], tokenizer: TextTokenizer
) -> None:
    fe = await make_frontend()
    first = await add(fe, "a-first", script, delay_s=0.02)
    body = {"model": "smol", "prompt": PROMPT, "max_tokens": 30}
    async with fe.client() as client:
        pending = asyncio.create_task(client.post("/v1/completions", json=body))
        await wait_until(lambda: first.sent_for(0) >= 5)
        second = await add(fe, "b-second", script, delay_s=0.02)
        await first.leave()
        response = await pending
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["choices"][0]["text"] == tokenizer.decode(script[:30])
        assert data["choices"][0]["finish_reason"] == "length"
        assert data["usage"]["prompt_tokens"] == len(PROMPT)
        assert data["usage"]["completion_tokens"] == 30
        assert len(second.requests) == 1

        # the last worker leaves mid-request: a clear 503, at once, not a hang
        pending = asyncio.create_task(client.post("/v1/completions", json=body))
        await wait_until(lambda: second.sent_for(1) >= 5)
        await second.leave()
        async with asyncio.timeout(5):
            response = await pending
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == "service_unavailable" and error["param"] is None
        assert "left while serving the request" in error["message"]

        # and a stream gets an error event, then [DONE]
        third = await add(fe, "c-third", script, delay_s=0.02)
        async with client.stream(
            "POST", "/v1/completions", json={**body, "stream": True}
        ) as response:
            lines = response.aiter_lines()
            await anext(lines)
            await third.leave()
            rest = [line async for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][6:])["error"]
        assert error["code"] == "no_worker_available" and "could not move" in error["message"]
        metrics = (await client.get("/metrics")).text
        assert migrations(metrics) == {"migrated": 1.0, "exhausted": 2.0}


async def test_migration_limit_zero_keeps_the_old_error(
    make_frontend: Any, script: list[int]
) -> None:
    fe = await make_frontend(migration_limit=0)
    first = await add(fe, "a-first", script, delay_s=0.02)
    async with fe.client() as client:
        pending = asyncio.create_task(
            client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 30})
        )
        await wait_until(lambda: first.sent_for(0) >= 5)
        second = await add(fe, "b-second", script, delay_s=0.02)
        await first.leave()
        response = await pending
        assert response.status_code == 503, response.text
        assert "migration_limit is 0" in response.json()["error"]["message"]
        assert not second.requests
