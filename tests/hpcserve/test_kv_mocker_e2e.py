"""`hpcserve up` with eight mocker workers and the KV router: prefixes go where they are cached.

One deployment for the module. The mocker reports prefix-cache hits in `num_cached_tokens`,
which the frontend returns as `usage.prompt_tokens_details.cached_tokens`: with eight
workers, a hit on every follow-up request means the router sent it to the worker that cached
the prefix (round robin would hit about one time in eight).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import httpx
import pytest
from up_helpers import UpProcess, started

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    run_dir = tmp_path_factory.mktemp("up-kv") / "run"
    args = ["configs/local-mocker-kv.yaml", "--set", "frontend.port=0",
            "--set", "engine.mocker.speedup=20"]  # fmt: skip
    with started(args, run_dir) as process:
        yield process


@pytest.fixture(scope="module")
def http(up: UpProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=up.base_url, timeout=60) as client:
        yield client


def complete(http: httpx.Client, prompt: list[int], max_tokens: int = 4) -> dict:
    response = http.post("/completions", json={"prompt": prompt, "max_tokens": max_tokens})
    assert response.status_code == 200, response.text
    return response.json()


def cached(body: dict) -> int:
    return (body["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def kv_index_blocks(up: UpProcess, http: httpx.Client) -> float:
    metrics = http.get(up.base_url.removesuffix("/v1") + "/metrics").text
    for line in metrics.splitlines():
        if line.startswith("hpcserve_frontend_kv_index_blocks "):
            return float(line.split()[1])
    raise AssertionError("no hpcserve_frontend_kv_index_blocks in /metrics")


def wait_for_kv_index(up: UpProcess, http: httpx.Client, at_least: float) -> None:
    """Poll until the worker's KV events (worker → NATS → frontend) reached the router's index."""
    deadline = time.monotonic() + 30
    while kv_index_blocks(up, http) < at_least:
        assert time.monotonic() < deadline, f"KV index below {at_least} blocks after 30 s"
        time.sleep(0.05)


def test_eight_simulated_workers_registered(up: UpProcess, http: httpx.Client) -> None:
    assert http.get(up.base_url.removesuffix("/v1") + "/health").json()["workers"] == 8
    workers = [name for name in up.pids() if name.startswith("worker-")]
    assert len(set(workers)) == 8
    body = complete(http, [5, 6, 7, 8], max_tokens=3)
    assert body["simulated"] is True and body["usage"]["completion_tokens"] == 3


def test_repeated_long_prefix_goes_to_the_worker_that_cached_it(
    up: UpProcess, http: httpx.Client
) -> None:
    rng = random.Random(1)
    for conversation in range(3):
        prefix = [rng.randrange(100, 40000) for _ in range(320)]  # 20 blocks
        known = kv_index_blocks(up, http)
        first = complete(http, [*prefix, 1, 2, 3])
        assert cached(first) == 0, f"conversation {conversation}: a fresh prefix was cached"
        wait_for_kv_index(up, http, known + 20)  # the prefix's 20 blocks are known
        for turn in range(5):
            body = complete(http, [*prefix, 50 + turn, 60 + turn, 70, 80])
            assert cached(body) >= 320, (conversation, turn, body["usage"])


def test_concurrent_repeats_land_on_the_workers_holding_their_prefixes(
    up: UpProcess, http: httpx.Client
) -> None:
    """Six cached prefixes, then four requests per prefix all at once: every one hits.

    Under concurrency the router sees its own in-flight requests pile onto the holders;
    a cost that counted each request's whole prompt as load (the old model) spread them
    over idle workers, where they missed."""
    rng = random.Random(2)
    prefixes = [[rng.randrange(100, 40000) for _ in range(320)] for _ in range(6)]
    known = kv_index_blocks(up, http)
    for prefix in prefixes:
        assert cached(complete(http, [*prefix, 1, 2, 3])) == 0
    wait_for_kv_index(up, http, known + 6 * 20)

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(base_url=up.base_url, timeout=60) as client:

            async def one(prefix: list[int], i: int) -> dict:
                body = {"prompt": [*prefix, 900 + i, 901 + i, 902], "max_tokens": 8}
                response = await client.post("/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()

            return await asyncio.gather(*(one(prefix, i) for i in range(4) for prefix in prefixes))

    bodies = asyncio.run(burst())
    misses = [body["usage"] for body in bodies if cached(body) < 320]
    assert not misses, f"{len(misses)} of {len(bodies)} concurrent repeats missed: {misses}"
