"""The worker's media path with real NATS and etcd: a request's images are served by a
"frontend" connection over `contract.media.serve_media` (as the frontend does), fetched by the
worker in chunks, prepared by the real torch VLM engine and generated with; a bad image is a
refusal naming "messages", a payload the frontend no longer holds an error chunk, and a
text-only engine refuses images before fetching anything."""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path

import pytest
import vlm_inputs as vi
from fake_engine import FakeEngine

from contract import bus
from contract.discovery import WorkerDirectory
from contract.media import MAX_CHUNK_BYTES, serve_media
from contract.messages import GenerateOutput
from contract.vlm import load_vlm_info
from mpi_workers.engine.torch.engine import TorchEngine
from mpi_workers.worker import Worker

pytestmark = pytest.mark.integration

_names = itertools.count()


def worker_for(engine, etcd_endpoint: str, nats_url: str) -> Worker:
    return Worker(
        engine, deployment=f"wmedia{os.getpid()}-{next(_names)}", worker_id="agg-g0-i0",
        role="agg", nats_url=nats_url, etcd_endpoint=etcd_endpoint, lease_ttl_s=5, capacity=4,
        drain_timeout_s=5,
    )  # fmt: skip


def tokens(chunks: list[GenerateOutput]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def test_worker_fetches_prepares_and_generates(
    tiny_vlm_dir: Path, etcd_endpoint: str, nats_url: str
) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_vlm_dir))
    token = load_vlm_info(tiny_vlm_dir).image_token_id
    engine = TorchEngine(tiny_vlm_dir, block_size=16, num_blocks=64, max_num_seqs=4)
    worker = worker_for(engine, etcd_endpoint, nats_url)
    store: dict[str, bytes] = {}
    frontend = await bus.connect(nats_url, "test-frontend")
    serving = await serve_media(frontend, vi.SUBJECT, store.get)
    await worker.start()
    try:
        directory = WorkerDirectory(etcd_endpoint, worker.deployment)
        await directory.start()
        try:
            assert directory.workers["agg-g0-i0"].media == ["embeds", "image"]
        finally:
            await directory.stop()

        # a multi-megapixel image: its payload takes several chunks on the bus
        images = [vi.image_bytes(5, 1800, 1200), vi.image_bytes(6)]
        assert len(images[0]) > 2 * min(MAX_CHUNK_BYTES, frontend.max_payload)
        ids = vi.processor_inputs(processor, images)["input_ids"][0].tolist()
        refs = vi.image_refs(ids, token, images, media_ids=["big", "small"])
        store.update(big=images[0], small=images[1])
        direct_request = vi.request("direct", ids, refs, max_tokens=6)
        direct = await engine.generate_all(
            direct_request, engine.prepare_media(direct_request, images)
        )
        chunks = await vi.reply_chunks(frontend, worker.subject, vi.request("nats", ids, refs, 6))
        assert chunks[-1].finish_reason in ("length", "stop"), chunks[-1].error
        assert tokens(chunks) == direct.token_ids
        assert chunks[-1].num_cached_tokens > 0  # the same images: the direct run's blocks

        broken = images[1][:50] + b"\0" * 100
        store["broken"] = broken
        bad_refs = vi.image_refs(ids, token, [images[0], broken], media_ids=["big", "broken"])
        bad = vi.request("bad", ids, bad_refs, 6)
        chunks = await vi.reply_chunks(frontend, worker.subject, bad)
        assert len(chunks) == 1 and chunks[0].finish_reason == "error"
        assert chunks[0].error_param == "messages"
        assert "image 2 could not be decoded" in (chunks[0].error or "")

        gone = vi.image_refs(ids, token, images, media_ids=["big", "forgotten"])
        chunks = await vi.reply_chunks(frontend, worker.subject, vi.request("gone", ids, gone, 6))
        assert len(chunks) == 1 and chunks[0].finish_reason == "error"
        assert "unknown or expired media" in (chunks[0].error or "")
        assert chunks[0].error_param is None

        wrong_run = [refs[0].model_copy(update={"length": refs[0].length - 1}), refs[1]]
        wrong = vi.request("run", ids, wrong_run, 6)
        chunks = await vi.reply_chunks(frontend, worker.subject, wrong)
        assert chunks[-1].error_param == "messages"
    finally:
        await worker.stop()
        await serving.unsubscribe()
        await frontend.close()


async def test_text_engine_refuses_images_before_fetching(
    etcd_endpoint: str, nats_url: str
) -> None:
    worker = worker_for(FakeEngine(), etcd_endpoint, nats_url)
    fetched: list[str] = []
    frontend = await bus.connect(nats_url, "test-frontend")

    def lookup(media_id: str) -> bytes | None:
        fetched.append(media_id)
        return None

    serving = await serve_media(frontend, vi.SUBJECT, lookup)
    await worker.start()
    try:
        assert worker.card.media == []
        ids = [5, 6, 7, 8]
        refs = vi.image_refs([5, 9, 9, 8], 9, [vi.image_bytes(1)])
        chunks = await vi.reply_chunks(frontend, worker.subject, vi.request("img", ids, refs, 3))
        await asyncio.sleep(0.1)
    finally:
        await worker.stop()
        await serving.unsubscribe()
        await frontend.close()
    assert len(chunks) == 1 and chunks[0].error_param == "messages"
    assert "takes no image input" in (chunks[0].error or "")
    assert fetched == []
