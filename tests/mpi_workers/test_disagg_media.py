"""Disaggregated serving of an image request by real `DisaggWorker`s (one process, real
etcd, NATS and tcp KV transfer, the tiny VLM): both workers fetch the image from the
"frontend"'s media subject; the prefill worker encodes it; both strategies give the tokens of
aggregated serving, and a bad image is refused naming "messages"."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import vlm_inputs as vi

from contract import bus
from contract.config import DisaggregationConfig
from contract.media import serve_media
from contract.vlm import load_vlm_info
from mpi_workers.disagg.worker import DisaggWorker

pytestmark = pytest.mark.integration

_ids = itertools.count()


@pytest.fixture(scope="module")
def engines(tiny_vlm_dir: Path):
    from mpi_workers.engine.torch.engine import TorchEngine

    return {
        name: TorchEngine(tiny_vlm_dir, block_size=16, num_blocks=64, max_num_seqs=4)
        for name in ("prefill-a", "decode-a")
    }


@contextlib.asynccontextmanager
async def deployment(engines, etcd_endpoint: str, nats_url: str, strategy: str
                     ) -> AsyncIterator[dict[str, DisaggWorker]]:  # fmt: skip
    name = f"dmedia{next(_ids)}"
    settings = DisaggregationConfig(strategy=strategy, kv_transfer="tcp", transfer_timeout_s=20)
    workers = {
        worker_id: DisaggWorker(
            engine, disaggregation=settings, deployment=name, worker_id=worker_id,
            role=worker_id.split("-")[0], nats_url=nats_url, etcd_endpoint=etcd_endpoint,
            lease_ttl_s=2, capacity=4, drain_timeout_s=5,
        )
        for worker_id, engine in engines.items()
    }  # fmt: skip
    for worker in workers.values():
        await worker.start()
    for worker in workers.values():
        for _ in range(100):
            if len(worker.directory.workers) == len(workers):
                break
            await asyncio.sleep(0.05)
    try:
        yield workers
    finally:
        for worker in workers.values():
            await worker.stop()
        for worker_id, engine in engines.items():
            bm = engine.block_manager
            assert bm.num_free_blocks == bm.num_blocks, f"{worker_id} leaked KV blocks"


@pytest.mark.parametrize("strategy", ["decode_first", "prefill_first"])
async def test_image_request_disaggregated_equals_aggregated(
    engines, tiny_vlm_dir: Path, etcd_endpoint: str, nats_url: str, strategy: str
) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_vlm_dir))
    token = load_vlm_info(tiny_vlm_dir).image_token_id
    images = [vi.image_bytes(90 + len(strategy))]
    ids = vi.processor_inputs(processor, images, "Where?")["input_ids"][0].tolist()
    refs = vi.image_refs(ids, token, images, media_ids=["img"])
    store = {"img": images[0], "broken": b"\x89PNG" + b"\0" * 64}
    served: list[str] = []

    def lookup(media_id: str) -> bytes | None:
        served.append(media_id)
        return store.get(media_id)

    frontend = await bus.connect(nats_url, "test-frontend")
    serving = await serve_media(frontend, vi.SUBJECT, lookup)
    try:
        engine = engines["prefill-a"]  # aggregated reference on one of the engines
        await engine.start()
        reference = vi.request("agg", ids, refs, max_tokens=8)
        expected = await engine.generate_all(reference, engine.prepare_media(reference, images))
        await engine.reset_prefix_cache()  # the prefill worker encodes the image again
        await engine.shutdown()
        async with deployment(engines, etcd_endpoint, nats_url, strategy) as workers:
            entry = workers["decode-a" if strategy == "decode_first" else "prefill-a"]
            chunks = await vi.reply_chunks(frontend, entry.subject, vi.request("dis", ids, refs, 8))
            assert chunks[-1].finish_reason in ("length", "stop"), chunks[-1].error
            assert [t for c in chunks for t in c.token_ids] == expected.token_ids
            assert served.count("img") >= 2  # both sides fetched it (one chunk each)

            bad = vi.image_refs(ids, token, [store["broken"]], media_ids=["broken"])
            chunks = await vi.reply_chunks(frontend, entry.subject, vi.request("bad", ids, bad, 8))
            assert chunks[-1].finish_reason == "error"
            assert chunks[-1].error_param == "messages", chunks[-1].error
    finally:
        await serving.unsubscribe()
        await frontend.close()
