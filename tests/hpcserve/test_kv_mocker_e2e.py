"""`hpcserve up` with eight mocker workers and the KV router: prefixes go where they are cached.

One deployment for the module. The mocker reports prefix-cache hits in `num_cached_tokens`,
which the frontend returns as `usage.prompt_tokens_details.cached_tokens`: with eight
workers, a hit on every follow-up request means the router sent it to the worker that cached
the prefix (round robin would hit about one time in eight).

The eight run four per process (the mocker's default `workers.N.per_process`): each keeps its
own id and subjects, and killing a process takes its four away and the supervisor brings them
back together (the module's last test).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml
from up_helpers import UpProcess, started

from contract import bus
from contract.discovery import worker_key
from contract.readiness import etcd_key_revision

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


IDS = [f"agg-g0-i{i}" for i in range(8)]
HOSTS = {"worker-agg-g0-i0-3": IDS[:4], "worker-agg-g0-i4-7": IDS[4:]}


def health_workers(up: UpProcess, http: httpx.Client) -> int:
    return http.get(up.base_url.removesuffix("/v1") + "/health").json()["workers"]


def resolved_services(up: UpProcess) -> dict:
    return yaml.safe_load((up.run_dir / "config.yaml").read_text())["services"]


def test_eight_simulated_workers_registered_from_two_processes(
    up: UpProcess, http: httpx.Client
) -> None:
    assert health_workers(up, http) == 8
    assert sorted(name for name in up.pids() if name.startswith("worker-")) == sorted(HOSTS)
    etcd = resolved_services(up)["etcd"]["endpoint"]
    for wid in IDS:  # a card of its own per worker
        assert etcd_key_revision(etcd, worker_key("local-mocker-kv", "agg", wid)) is not None
    body = complete(http, [5, 6, 7, 8], max_tokens=3)
    assert body["simulated"] is True and body["usage"]["completion_tokens"] == 3
    for name, ids in HOSTS.items():  # each worker's lines carry its own tag
        log = (up.run_dir / "logs" / f"{name}.log").read_text()
        for wid in ids:
            index = wid.rsplit("-i", 1)[1]
            assert re.search(rf"\[worker agg g0 i{index} rank0\] \S+: registered {wid} ", log)


def test_requests_are_routed_to_all_eight_ids_and_answered(
    up: UpProcess, http: httpx.Client
) -> None:
    """Fresh prompts through the frontend: its requests reach each of the eight ids' own
    generate subjects (seen on NATS) and every one is answered."""
    import nats

    nats_url = resolved_services(up)["nats"]["endpoint"]
    generate = bus.worker_subject("local-mocker-kv", "*")

    async def spread() -> set[str]:
        seen: set[str] = set()
        nc = await nats.connect(nats_url)

        async def on_request(msg) -> None:  # type: ignore[no-untyped-def]
            seen.add(msg.subject.split(".")[-2])

        await nc.subscribe(generate, cb=on_request)
        await nc.flush()
        rng = random.Random(3)
        try:
            async with httpx.AsyncClient(base_url=up.base_url, timeout=60) as client:
                for _ in range(8):  # rounds of 8 concurrent fresh prompts, until all seen
                    prompts = [[rng.randrange(100, 40000) for _ in range(40)] for _ in range(8)]
                    responses = await asyncio.gather(*(
                        client.post("/completions", json={"prompt": p, "max_tokens": 2})
                        for p in prompts
                    ))  # fmt: skip
                    assert all(r.status_code == 200 for r in responses)
                    await nc.flush()
                    if len(seen) == 8:
                        break
        finally:
            await nc.close()
        return seen

    assert asyncio.run(spread()) == set(IDS)


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


def test_killing_a_process_takes_its_four_workers_away_and_back(
    up: UpProcess, http: httpx.Client
) -> None:
    """Last in the module: SIGKILL the process hosting i4..i7: the four cards go at once
    (the supervisor drops them), the frontend routes to the other four, and the restarted
    process registers the four anew."""
    etcd = resolved_services(up)["etcd"]["endpoint"]
    name, ids = "worker-agg-g0-i4-7", IDS[4:]
    keys = [worker_key("local-mocker-kv", "agg", wid) for wid in ids]
    old = [etcd_key_revision(etcd, key) for key in keys]
    old_pid = up.pids()[name]
    os.killpg(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while health_workers(up, http) != 4:
        assert time.monotonic() < deadline, "the frontend still counts the dead process's workers"
        time.sleep(0.05)
    assert all(etcd_key_revision(etcd, key) is None for key in keys)
    up.wait_for_line(re.compile(rf"{name} is back \(restart 1\)"), 60)
    assert up.pids()[name] != old_pid
    new = [etcd_key_revision(etcd, key) for key in keys]
    assert all(rev is not None and rev != was for rev, was in zip(new, old, strict=True))
    while health_workers(up, http) != 8:
        assert time.monotonic() < deadline + 60, "the frontend did not see them come back"
        time.sleep(0.05)
    assert complete(http, [9, 8, 7], max_tokens=2)["usage"]["completion_tokens"] == 2
