"""The worker's kv_snapshot subject, read by the frontend's KvIndexFeed over real NATS."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from contract.block_hash import block_hashes
from frontend.kv_index import KvIndex, KvIndexFeed


@pytest.mark.integration
async def test_snapshot_over_nats_from_a_real_worker(nats_url: str, etcd_endpoint: str) -> None:
    """A mocker worker answers kv_snapshot; a feed that started late rebuilds from it."""
    from contract.config import MockerConfig
    from contract.discovery import WorkerDirectory
    from contract.messages import GenerateRequest, SamplingParams
    from mpi_workers.engine.mocker import MockerEngine, ModelShape
    from mpi_workers.worker import Worker

    deployment = f"kvidx-{uuid.uuid4().hex[:8]}"
    engine = MockerEngine(MockerConfig(speedup=100.0), shape=ModelShape(vocab_size=1000))
    worker = Worker(
        engine, deployment=deployment, worker_id="w0", role="agg", nats_url=nats_url,
        etcd_endpoint=etcd_endpoint, lease_ttl_s=5, capacity=8,
    )  # fmt: skip
    await worker.start()
    directory = WorkerDirectory(etcd_endpoint, deployment)
    feed = KvIndexFeed(KvIndex(), nats_url=nats_url, deployment=deployment)
    try:
        prompt = list(range(100, 170))
        req = GenerateRequest(
            request_id="r1", token_ids=prompt, sampling=SamplingParams(max_tokens=2)
        )
        async for _ in engine.generate(req):
            pass
        await feed.start()  # the frontend "restarts" after the events were published
        directory.add_listener(feed.on_workers_changed)
        await directory.start()
        want = block_hashes(prompt, 16)
        for _ in range(100):
            if feed.index.overlaps(want, ["w0"])["w0"] == len(want):
                break
            await asyncio.sleep(0.05)
        assert feed.index.overlaps(want, ["w0"]) == {"w0": len(want)}
        assert feed.num_snapshots >= 1
        # new events after the snapshot continue from its seq
        req2 = GenerateRequest(
            request_id="r2", token_ids=list(range(300, 340)), sampling=SamplingParams(max_tokens=1)
        )
        async for _ in engine.generate(req2):
            pass
        want2 = block_hashes(list(range(300, 340)), 16)
        for _ in range(100):
            if feed.index.overlaps(want2, ["w0"])["w0"] == len(want2):
                break
            await asyncio.sleep(0.05)
        assert feed.index.overlaps(want2, ["w0"]) == {"w0": len(want2)}
        assert feed.num_gaps == 0
    finally:
        await directory.stop()
        await feed.stop()
        await worker.stop()


@pytest.mark.integration
async def test_index_equals_the_workers_cache_after_a_run_with_evictions(
    nats_url: str, etcd_endpoint: str
) -> None:
    """Two mocker workers with small KV pools, 48 new prompts sent 8 at a time (so steps
    overlap, prompts share prefixes, and blocks are evicted): once the events are in, the
    feed's index holds exactly each worker's cached blocks, with no gap and no snapshot but
    the joiners'."""
    from contract.config import MockerConfig
    from contract.discovery import WorkerDirectory
    from contract.messages import GenerateRequest, SamplingParams
    from mpi_workers.engine.mocker import MockerEngine, ModelShape
    from mpi_workers.worker import Worker

    deployment = f"kvidx-{uuid.uuid4().hex[:8]}"
    engines = {
        f"w{i}": MockerEngine(MockerConfig(speedup=1000.0, num_blocks=40),
                              shape=ModelShape(vocab_size=1000))
        for i in range(2)
    }  # fmt: skip
    workers = [
        Worker(engine, deployment=deployment, worker_id=wid, role="agg", nats_url=nats_url,
               etcd_endpoint=etcd_endpoint, lease_ttl_s=5, capacity=8)
        for wid, engine in engines.items()
    ]  # fmt: skip
    for worker in workers:
        await worker.start()
    directory = WorkerDirectory(etcd_endpoint, deployment)
    feed = KvIndexFeed(KvIndex(), nats_url=nats_url, deployment=deployment)
    await feed.start()
    directory.add_listener(feed.on_workers_changed)
    await directory.start()

    def synced() -> bool:
        return all(feed._sync.get(w) is not None and feed._sync[w].last_seq is not None
                   and not feed._sync[w].pending for w in engines)  # fmt: skip

    async def run(engine: MockerEngine, n: int) -> None:
        shared = [7] * 16 * (n % 3)  # 0-2 blocks of a prefix some prompts share
        prompt = shared + [n + 1] * (16 * (1 + n % 4) + 5)
        request = GenerateRequest(request_id=f"r{n}", token_ids=prompt,
                                  sampling=SamplingParams(max_tokens=3 + n % 5))  # fmt: skip
        async for _ in engine.generate(request):
            pass

    try:
        for _ in range(200):
            if synced():
                break
            await asyncio.sleep(0.02)
        assert synced()
        pool = list(engines.values())
        for start in range(0, 48, 8):
            await asyncio.gather(*(run(pool[n % 2], n) for n in range(start, start + 8)))
        want = {w: set(engine.cached_block_hashes()) for w, engine in engines.items()}
        assert all(want.values())
        for _ in range(200):
            if all(feed.index.blocks_of(w) == want[w] for w in engines):
                break
            await asyncio.sleep(0.02)
        assert {w: feed.index.blocks_of(w) for w in engines} == want
        assert feed.num_gaps == 0 and feed.num_snapshots == 2
    finally:
        await directory.stop()
        await feed.stop()
        for worker in workers:
            await worker.stop()
