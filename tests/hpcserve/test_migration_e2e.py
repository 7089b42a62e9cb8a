"""Request migration end to end: real etcd, NATS, frontend and workers; one worker is killed
(SIGKILL to its process group) while streams are under way, and the official `openai`
client sees every stream finish as if nothing happened.

The deployments are started with `hpcserve.launcher.start_deployment`, which watches
nothing: a dead worker does not stop the others (as `hpcserve up` does or does not, under
its restart policy). The lease TTL is short, so the frontend notices the death in seconds.

- the real default model (torch engine, SmolLM2-135M on the CPU), 2 workers: 8 greedy
  streams give exactly the text of an undisturbed run of the same requests;
- the mocker engine (fast, simulated tokens that depend on the prompt, so only counts are
  compared): streams finish with every token counted; when the last worker dies, streams
  end with an error event and a plain request gets a 503, at once, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from contract.config import load_config
from hpcserve.launcher import Deployment, start_deployment, stop_deployment

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
LEASE_TTL_S = 3
PROMPTS = [
    "The history of the printing press",
    "A recipe for tomato soup starts with",
    "In the year 2050, cities will",
    "The main rules of chess are",
    "Photosynthesis is the process by which",
    "My favourite holiday was a trip to",
    "To write a good essay, first",
    "The ocean is home to many animals, such as",
]


@contextlib.contextmanager
def deployment(
    config: str, run_dir: Path, *overrides: str, serving: int = 2
) -> Iterator[Deployment]:
    """A local deployment (by default two agg workers) whose frontend sees `serving` workers
    it routes to; stopped (what is left of it) at the end."""
    config_obj = load_config(
        REPO / config,
        [
            "frontend.port=0",
            f"run_dir={run_dir}",
            f"services.lease_ttl_s={LEASE_TTL_S}",
            "workers.0.count=2",
            "workers.0.per_process=1",  # each worker dies alone (the mocker hosts several)
            *overrides,
        ],
    )
    said: list[str] = []
    started = start_deployment(config_obj, say=said.append)
    try:
        health = started.url.removesuffix("/v1") + "/health"
        deadline = time.monotonic() + 60
        while httpx.get(health).json().get("workers") != serving:  # the frontend's view
            assert time.monotonic() < deadline, f"the frontend never saw {serving} workers"
            time.sleep(0.1)
        yield started
    finally:
        stop_deployment(started, say=said.append)


def kill_worker(started: Deployment, name: str) -> None:
    """SIGKILL the worker's whole process group (it was started as a session leader)."""
    pid = json.loads((started.run_dir / "pids.json").read_text())[name]
    os.killpg(pid, signal.SIGKILL)


def migrations(started: Deployment) -> dict[str, float]:
    text = httpx.get(started.url.removesuffix("/v1") + "/metrics").text
    found = {}
    for line in text.splitlines():
        if line.startswith("hpcserve_frontend_migrations_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('"')[1]] = float(value)
    return found


def first_tokens(started: Deployment) -> float:
    """Requests the frontend has seen a first token of (its time-to-first-token count)."""
    text = httpx.get(started.url.removesuffix("/v1") + "/metrics").text
    for line in text.splitlines():
        if line.startswith("hpcserve_frontend_time_to_first_token_seconds_count "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class MidStreamKill:
    """Kills a worker in the middle of its streams, judged by the frontend, not by the client:
    on a loaded 2-core machine the client read its streams seconds behind them (it saw
    streams going after the frontend had finished them all), and one torch worker finished
    its streams before the other had begun.

    `ready(outcomes)` (a `kill_when`): every stream's first token has reached the frontend and
    a worker still serves some (the frontend's in-flight count); `kill()` kills that worker.
    """

    LOOK_EVERY_S = 0.05  # not at every chunk: a scrape costs the frontend and the client

    def __init__(self, started: Deployment, streams: int) -> None:
        self.started = started
        self.first_tokens = first_tokens(started) + streams  # this many once all have begun
        self.looked = 0.0
        self.victim: str | None = None

    def ready(self, outcomes: list[Outcome]) -> bool:
        if time.monotonic() - self.looked < self.LOOK_EVERY_S:
            return False
        self.looked = time.monotonic()
        if first_tokens(self.started) < self.first_tokens:
            return False
        health = httpx.get(self.started.url.removesuffix("/v1") + "/health").json()
        in_flight = health["in_flight"]
        busiest = max(in_flight, key=in_flight.get)
        if not in_flight[busiest]:
            raise AssertionError(f"every stream ended before the kill: {outcomes}")
        self.victim = busiest
        return True

    def kill(self) -> None:
        assert self.victim is not None
        kill_worker(self.started, f"worker-{self.victim}")


@dataclass
class Outcome:
    text: str = ""
    chunks: int = 0
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


async def stream_all(
    url: str,
    prompts: list[str],
    max_tokens: int,
    kill_when: Callable[[list[Outcome]], bool] | None = None,
    kill: Callable[[], None] | None = None,
) -> list[Outcome]:
    """Every prompt as a greedy stream at once; `kill()` once `kill_when(outcomes so far)`."""
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    model = (await client.models.list()).data[0].id
    outcomes = [Outcome() for _ in prompts]
    progress = asyncio.Event()

    async def one(prompt: str, outcome: Outcome) -> None:
        try:
            stream = await client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )  # fmt: skip
            async for chunk in stream:
                if chunk.choices:
                    outcome.text += chunk.choices[0].text
                    outcome.chunks += 1
                    outcome.finish_reason = chunk.choices[0].finish_reason or outcome.finish_reason
                if chunk.usage is not None:
                    outcome.prompt_tokens = chunk.usage.prompt_tokens
                    outcome.completion_tokens = chunk.usage.completion_tokens
                progress.set()
        except openai.APIError as exc:  # an error event in the stream
            outcome.error = str(exc)

    async def killer() -> None:
        assert kill_when is not None and kill is not None
        while not kill_when(outcomes):
            progress.clear()
            with contextlib.suppress(TimeoutError):  # looks again without progress too
                async with asyncio.timeout(0.05):
                    await progress.wait()
        kill()

    tasks = [asyncio.create_task(one(p, o)) for p, o in zip(prompts, outcomes, strict=True)]
    if kill is not None:
        tasks.append(asyncio.create_task(killer()))
    try:
        async with asyncio.timeout(300):  # a hang fails the test instead of blocking it
            await asyncio.gather(*tasks)
    finally:
        await client.close()
    return outcomes


def all_streaming(at_least: int) -> Callable[[list[Outcome]], bool]:
    """Every stream has `at_least` chunks and none has finished: all are mid-request."""

    def check(outcomes: list[Outcome]) -> bool:
        if any(o.finish_reason or o.error for o in outcomes):
            raise AssertionError(f"a stream ended before the kill: {outcomes}")
        return all(o.chunks >= at_least for o in outcomes)

    return check


def test_greedy_streams_survive_a_killed_worker_token_for_token(tmp_path: Path) -> None:
    # the kill waits until every stream has begun and kills a worker that still serves some
    # (MidStreamKill). On a loaded 2-core machine the two torch workers (each with torch's
    # default threads, one per core) drift far apart: streams of one ended (64 tokens) while
    # the other's had 10-11 chunks (2 of 15 runs), or none at all; "every stream at its 6th
    # chunk, none ended" (the older kill condition) cannot be waited for
    max_tokens = 64
    with deployment("configs/local-agg.yaml", tmp_path / "run") as started:
        reference = asyncio.run(stream_all(started.url, PROMPTS, max_tokens))
        for outcome in reference:
            assert outcome.error is None and outcome.finish_reason == "length", outcome
            assert outcome.completion_tokens == max_tokens, outcome
        assert migrations(started) == {"migrated": 0.0, "exhausted": 0.0}

        killed_at = []
        mid_stream = MidStreamKill(started, len(PROMPTS))

        def kill() -> None:
            killed_at.append(time.monotonic())
            mid_stream.kill()

        t0 = time.monotonic()
        disturbed = asyncio.run(
            stream_all(started.url, PROMPTS, max_tokens, mid_stream.ready, kill)
        )
        assert killed_at, "the worker was never killed"
        for ref, got in zip(reference, disturbed, strict=True):
            assert got.error is None, got.error
            assert got.text == ref.text
            assert got.finish_reason == "length"
            assert (got.prompt_tokens, got.completion_tokens) == (ref.prompt_tokens, max_tokens)
        counts = migrations(started)
        assert counts["migrated"] >= 1 and counts["exhausted"] == 0, counts
        print(f"migrated {counts['migrated']:g} streams; {time.monotonic() - t0:.1f} s")


def test_mocker_streams_migrate_then_fail_cleanly_when_no_worker_is_left(
    tmp_path: Path,
) -> None:
    max_tokens = 400  # about 2 s of simulated decoding
    prompts = PROMPTS[:4]
    with deployment("configs/local-mocker-kv.yaml", tmp_path / "run") as started:
        # one worker dies mid-stream: every stream still gets all its tokens
        outcomes = asyncio.run(
            stream_all(
                started.url, prompts, max_tokens, all_streaming(at_least=20),
                lambda: kill_worker(started, "worker-agg-g0-i0"),
            )
        )  # fmt: skip
        for outcome in outcomes:
            assert outcome.error is None, outcome.error
            assert outcome.finish_reason == "length"
            assert outcome.completion_tokens == max_tokens
        counts = migrations(started)
        assert counts["migrated"] >= 1 and counts["exhausted"] == 0, counts
        migrated = counts["migrated"]

        # the last worker dies: streams end with an error event, a plain request gets a
        # 503 with an OpenAI error body; within the lease TTL and change, not a hang
        async def last_worker_dies() -> tuple[list[Outcome], httpx.Response, float]:
            async with httpx.AsyncClient(base_url=started.url, timeout=120) as http:
                body = {"prompt": "plain", "max_tokens": max_tokens, "ignore_eos": True}
                plain = asyncio.create_task(http.post("/completions", json=body))
                killed = []

                def kill() -> None:
                    killed.append(time.monotonic())
                    kill_worker(started, "worker-agg-g0-i1")

                streamed = await stream_all(
                    started.url, prompts[:2], max_tokens, all_streaming(at_least=20), kill
                )
                response = await plain
                return streamed, response, time.monotonic() - killed[0]

        streamed, response, took = asyncio.run(last_worker_dies())
        for outcome in streamed:
            assert outcome.error is not None and outcome.finish_reason is None, outcome
            assert "left while serving the request" in outcome.error
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == "service_unavailable" and error["param"] is None
        assert "left while serving the request" in error["message"]
        assert took < LEASE_TTL_S + 5, took
        counts = migrations(started)
        assert counts == {"migrated": migrated, "exhausted": 3.0}, counts


@pytest.mark.parametrize("strategy", ["decode_first", "prefill_first"])
def test_disaggregated_streams_survive_a_killed_decode_worker(
    tmp_path: Path, strategy: str
) -> None:
    """One prefill worker, two decode workers (KV over TCP). decode_first: the frontend
    moves the lost requests to the other decode worker; prefill_first: to a prefill worker
    again (its role), which hands them to the surviving decode worker."""
    max_tokens = 32
    overrides = [
        "workers.0.count=1", "workers.1.count=2", "disaggregation.kv_transfer=tcp",
        f"disaggregation.strategy={strategy}",
    ]  # fmt: skip
    serving = 2 if strategy == "decode_first" else 1
    with deployment(
        "configs/local-disagg.yaml", tmp_path / "run", *overrides, serving=serving
    ) as started:
        reference = asyncio.run(stream_all(started.url, PROMPTS, max_tokens))
        for outcome in reference:
            assert outcome.error is None and outcome.finish_reason == "length", outcome
        disturbed = asyncio.run(
            stream_all(
                started.url, PROMPTS, max_tokens, all_streaming(at_least=8),
                lambda: kill_worker(started, "worker-decode-g1-i0"),
            )
        )  # fmt: skip
        for ref, got in zip(reference, disturbed, strict=True):
            assert got.error is None, got.error
            assert got.text == ref.text
            assert (got.finish_reason, got.completion_tokens) == ("length", max_tokens)
        counts = migrations(started)
        assert counts["migrated"] >= 1 and counts["exhausted"] == 0, counts
