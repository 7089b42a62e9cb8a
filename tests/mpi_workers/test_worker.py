"""The worker with real etcd and NATS: registration, request plane, events, abort, shutdown.

In-process tests use the fake engine; the process tests run `python -m mpi_workers` with it
(`--engine-factory`), so kill -9 and SIGTERM hit a real worker process.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aetcd
import pytest
import yaml
from fake_engine import FakeEngine

from contract import bus
from contract.discovery import (
    WorkerCard,
    WorkerDirectory,
    etcd_client,
    worker_key,
    workers_prefix,
)
from contract.messages import (
    AbortRequest,
    GenerateOutput,
    GenerateRequest,
    KvEventBatch,
    KvRemoved,
    KvStored,
    LoadMetrics,
    PoolingParams,
    SamplingParams,
)
from mpi_workers.worker import Worker, error_param

_names = itertools.count()
HERE = Path(__file__).parent


def unique_deployment() -> str:
    return f"wtest{os.getpid()}-{next(_names)}"


@pytest.fixture
async def started_worker(etcd_endpoint: str, nats_url: str) -> AsyncIterator[Worker]:
    worker = Worker(
        FakeEngine(token_delay_s=0.0),
        deployment=unique_deployment(),
        worker_id="agg-g0-i0",
        role="agg",
        nats_url=nats_url,
        etcd_endpoint=etcd_endpoint,
        lease_ttl_s=5,
        capacity=8,
        drain_timeout_s=5,
    )
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


async def stream(nc, subject: str, request: GenerateRequest, timeout_s: float = 10):
    """Send `request` and collect its chunks up to the one with finish_reason."""
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox)
    await nc.publish(subject, request.model_dump_json().encode(), reply=inbox)
    chunks: list[GenerateOutput] = []
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                msg = await subscription.next_msg(timeout=timeout_s)
                chunk = GenerateOutput.model_validate_json(msg.data)
                chunks.append(chunk)
                if chunk.finish_reason is not None:
                    return chunks
    finally:
        await subscription.unsubscribe()


async def test_card_is_registered(started_worker: Worker, etcd_endpoint: str) -> None:
    directory = WorkerDirectory(etcd_endpoint, started_worker.deployment)
    await directory.start()
    try:
        card = directory.workers["agg-g0-i0"]
    finally:
        await directory.stop()
    assert card.role == "agg"
    assert card.model == "fake-model"
    assert card.capacity == 8
    assert card.block_size == 4
    assert card.max_model_len == 256
    assert card.subject == bus.worker_subject(started_worker.deployment, "agg-g0-i0")
    assert card.abort_subject == bus.abort_subject(started_worker.deployment, "agg-g0-i0")


async def test_request_round_trip(started_worker: Worker, nats_url: str) -> None:
    nc = await bus.connect(nats_url, "test")
    try:
        request = GenerateRequest(
            request_id="r1", token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=5)
        )
        chunks = await stream(nc, started_worker.subject, request)
    finally:
        await nc.close()
    tokens = [t for chunk in chunks for t in chunk.token_ids]
    assert tokens == [8, 9, 10, 11, 12]
    assert chunks[-1].finish_reason == "length"
    assert all(chunk.request_id == "r1" for chunk in chunks)


async def test_bad_request_gets_one_error_chunk_naming_the_param(
    started_worker: Worker, nats_url: str
) -> None:
    nc = await bus.connect(nats_url, "test")
    try:
        bad = GenerateRequest(request_id="r2", token_ids=[1], sampling=SamplingParams(max_tokens=0))
        chunks = await stream(nc, started_worker.subject, bad)
        wrong_version = GenerateRequest(request_id="r3", token_ids=[1], version=99)
        version_chunks = await stream(nc, started_worker.subject, wrong_version)
    finally:
        await nc.close()
    assert len(chunks) == 1
    assert chunks[0].finish_reason == "error"
    assert chunks[0].error_param == "max_tokens"
    assert "max_tokens" in (chunks[0].error or "")
    assert version_chunks[-1].finish_reason == "error"
    assert version_chunks[-1].error_param == "version"


@pytest.mark.parametrize("role", ["agg", "prefill", "decode"])
def test_disaggregated_roles_declare_prompt_logprobs_unsupported(role: str) -> None:
    """A prefill or decode worker does not carry the prompt's logprobs across the hand-off,
    nor an output constraint: its card says so (the frontend then refuses echo + logprobs
    with a 400 naming `echo`, a constraint naming `response_format`)."""
    worker = Worker(FakeEngine(), deployment="d", worker_id=f"{role}-g0-i0", role=role,
                    nats_url="nats://unused", etcd_endpoint="unused", lease_ttl_s=5,
                    capacity=1)  # fmt: skip
    assert ("prompt_logprobs" in worker.card.unsupported_params) is (role != "agg")
    # an output constraint crosses the hand-off on the torch engine only
    assert ("guided" in worker.card.unsupported_params) is (role != "agg")
    worker.engine.kind = "torch"
    assert "guided" not in worker.card.unsupported_params


def test_error_param_convention() -> None:
    assert error_param(ValueError("max_tokens: must be >= 1")) == "max_tokens"
    assert error_param(ValueError("temperature must be >= 0")) == "temperature"
    assert error_param(ValueError("'top_p' must be in (0, 1]")) == "top_p"
    assert error_param(ValueError("the prompt is too long")) is None
    exc = ValueError("too long")
    exc.param = "token_ids"  # type: ignore[attr-defined]
    assert error_param(exc) == "token_ids"


async def test_abort_reaches_the_engine(etcd_endpoint: str, nats_url: str) -> None:
    engine = FakeEngine(token_delay_s=0.2)
    worker = Worker(
        engine, deployment=unique_deployment(), worker_id="agg-g0-i0", role="agg",
        nats_url=nats_url, etcd_endpoint=etcd_endpoint, lease_ttl_s=5, capacity=8,
    )  # fmt: skip
    await worker.start()
    nc = await bus.connect(nats_url, "test")
    try:
        request = GenerateRequest(
            request_id="long", token_ids=[1, 2], sampling=SamplingParams(max_tokens=100)
        )
        collecting = asyncio.create_task(stream(nc, worker.subject, request))
        await asyncio.sleep(0.5)
        abort = AbortRequest(request_id="long")
        await nc.publish(worker.abort_subject, abort.model_dump_json().encode())
        chunks = await collecting
    finally:
        await nc.close()
        await worker.stop()
    assert engine.aborted == ["long"]
    assert chunks[-1].finish_reason == "abort"
    assert len([t for c in chunks for t in c.token_ids]) < 100


async def test_events_and_load_metrics_are_published(started_worker: Worker, nats_url: str) -> None:
    nc = await bus.connect(nats_url, "test")
    try:
        kv = await nc.subscribe(bus.kv_events_subject(started_worker.deployment))
        load = await nc.subscribe(bus.load_metrics_subject(started_worker.deployment))
        for n in range(2):
            request = GenerateRequest(
                request_id=f"kv{n}", token_ids=list(range(8 * (n + 1))),
                sampling=SamplingParams(max_tokens=2),
            )  # fmt: skip
            await stream(nc, started_worker.subject, request)
        batches = [
            KvEventBatch.model_validate_json((await kv.next_msg(timeout=5)).data) for _ in range(2)
        ]
        metrics = LoadMetrics.model_validate_json((await load.next_msg(timeout=5)).data)
    finally:
        await nc.close()
    assert [b.seq for b in batches] == [1, 2]
    assert all(b.worker_id == "agg-g0-i0" for b in batches)
    assert batches[0].events[0].kind == "stored"
    assert len(batches[1].events[0].block_hashes) == 4
    assert metrics.worker_id == "agg-g0-i0"
    assert metrics.total_blocks == 100



async def test_kv_events_of_several_steps_go_as_one_batch(
    started_worker: Worker, nats_url: str
) -> None:
    """Steps that ended before the publisher's pass: one message, their events in order, one
    `seq` (every frontend process pays for each message it receives)."""
    nc = await bus.connect(nats_url, "test")
    try:
        kv = await nc.subscribe(bus.kv_events_subject(started_worker.deployment))
        await nc.flush()
        steps = [[KvStored(parent_hash=None, block_hashes=[1, 2])],
                 [KvStored(parent_hash=2, block_hashes=[3]), KvRemoved(block_hashes=[1])],
                 [KvRemoved(block_hashes=[3])]]  # fmt: skip
        for events in steps:  # on the worker's loop: queued, no pass in between
            started_worker._kv_sink(events)
        batch = KvEventBatch.model_validate_json((await kv.next_msg(timeout=5)).data)
        later = [KvStored(parent_hash=None, block_hashes=[4])]
        started_worker._kv_sink(later)  # a later pass: the next message, in order
        after = KvEventBatch.model_validate_json((await kv.next_msg(timeout=5)).data)
    finally:
        await nc.close()
    assert batch.seq == 1
    assert batch.events == [event for events in steps for event in events]
    assert (after.seq, after.events) == (2, later)  # no message between the two


# worker processes


def write_config(tmp_path: Path, deployment: str, etcd: str, nats_url: str, ttl: int) -> Path:
    config = {
        "name": deployment,
        "model": {"path": str(tmp_path)},
        "services": {
            "etcd": {"start": False, "endpoint": etcd},
            "nats": {"start": False, "endpoint": nats_url},
            "lease_ttl_s": ttl,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def spawn_worker(config_path: Path, token_delay_s: float) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(HERE), FAKE_ENGINE_TOKEN_DELAY_S=str(token_delay_s))
    argv = [
        sys.executable, "-m", "mpi_workers", "--config", str(config_path),
        "--group", "0", "--index", "0", "--engine-factory", "fake_engine:make_fake_engine",
        "--drain-timeout", "20",
    ]  # fmt: skip
    log = open(config_path.parent / "worker.log", "wb")  # noqa: SIM115 (kept by the child)
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


async def registered_keys(etcd_endpoint: str, deployment: str) -> list[str]:
    client: aetcd.Client = etcd_client(etcd_endpoint)
    try:
        result = await client.get_prefix(workers_prefix(deployment).encode())
        return [kv.key.decode() for kv in result]
    finally:
        await client.close()


async def wait_for(predicate, timeout_s: float, poll_s: float = 0.1) -> float:
    """Await until `await predicate()` is true; returns the seconds it took."""
    start = time.monotonic()
    while not await predicate():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(poll_s)
    return time.monotonic() - start


@pytest.mark.integration
async def test_lease_lapses_after_kill_9(tmp_path: Path, etcd_endpoint: str, nats_url: str):
    deployment, ttl = unique_deployment(), 3
    process = spawn_worker(write_config(tmp_path, deployment, etcd_endpoint, nats_url, ttl), 0)
    try:
        await wait_for(lambda: _has_keys(etcd_endpoint, deployment, 1), 30)
        process.send_signal(signal.SIGKILL)
        process.wait(5)
        took = await wait_for(lambda: _has_keys(etcd_endpoint, deployment, 0), ttl + 3)
    finally:
        process.kill()
        process.wait()
    assert took <= ttl + 3


async def _has_keys(etcd_endpoint: str, deployment: str, count: int) -> bool:
    return len(await registered_keys(etcd_endpoint, deployment)) == count


async def _card_draining(etcd_endpoint: str, deployment: str) -> bool:
    client: aetcd.Client = etcd_client(etcd_endpoint)
    try:
        result = await client.get_prefix(workers_prefix(deployment).encode())
        return any(WorkerCard.model_validate_json(kv.value).draining for kv in result)
    finally:
        await client.close()


@pytest.mark.integration
async def test_sigterm_marks_draining_then_finishes_then_deregisters(
    tmp_path: Path, etcd_endpoint: str, nats_url: str
):
    deployment = unique_deployment()
    config_path = write_config(tmp_path, deployment, etcd_endpoint, nats_url, 10)
    process = spawn_worker(config_path, token_delay_s=0.1)
    nc = await bus.connect(nats_url, "test")
    try:
        await wait_for(lambda: _has_keys(etcd_endpoint, deployment, 1), 30)
        subject = bus.worker_subject(deployment, "agg-g0-i0")
        request = GenerateRequest(
            request_id="drain", token_ids=[3], sampling=SamplingParams(max_tokens=20)
        )
        collecting = asyncio.create_task(stream(nc, subject, request, timeout_s=30))
        await asyncio.sleep(0.5)  # a few tokens in
        process.send_signal(signal.SIGTERM)
        # Out of routing at once (the card says draining), long before the 2 s request ends...
        took = await wait_for(lambda: _card_draining(etcd_endpoint, deployment), 1.5, 0.05)
        assert not collecting.done()
        # ...and the request still finishes in full; then the card goes.
        chunks = await collecting
        await wait_for(lambda: _has_keys(etcd_endpoint, deployment, 0), 10)
        exit_code = await asyncio.to_thread(process.wait, 15)
    finally:
        await nc.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    log = (tmp_path / "worker.log").read_text()
    assert took < 1.5
    assert chunks[-1].finish_reason == "length", log
    assert [t for c in chunks for t in c.token_ids] == [4 + i for i in range(20)]
    assert exit_code == 0, log
    assert "[worker agg g0 i0 rank0]" in log
    assert worker_key(deployment, "agg", "agg-g0-i0") not in await registered_keys(
        etcd_endpoint, deployment
    )


async def test_one_step_for_one_inbox_is_one_batch_message(
    etcd_endpoint: str, nats_url: str
) -> None:
    """Requests that say `batch_replies` get a step's chunks as one JSON array on
    `<inbox>.batch`; each request's chunks stay in order and end with its finish reason. A
    request that does not say so gets its chunks one by one on its own reply subject."""
    from pydantic import TypeAdapter

    from contract.config import MockerConfig
    from contract.messages import BATCH_SUFFIX
    from mpi_workers.engine.mocker import MockerEngine, ModelShape

    engine = MockerEngine(MockerConfig(speedup=1000.0), num_blocks=64,
                          shape=ModelShape(vocab_size=100, eos_token_ids=(2,)))  # fmt: skip
    worker = Worker(engine, deployment=unique_deployment(), worker_id="agg-g0-i0", role="agg",
                    nats_url=nats_url, etcd_endpoint=etcd_endpoint, lease_ttl_s=5,
                    capacity=8)  # fmt: skip
    await worker.start()
    nc = await bus.connect(nats_url, "test")
    try:
        inbox = nc.new_inbox()
        subscription = await nc.subscribe(f"{inbox}.>")
        ids = ["b0", "b1", "b2", "single"]
        for rid in ids:
            request = GenerateRequest(request_id=rid, token_ids=[5, 6, 7, len(rid)],
                                      sampling=SamplingParams(max_tokens=6),
                                      batch_replies=rid != "single")  # fmt: skip
            await nc.publish(worker.subject, request.model_dump_json().encode(),
                             reply=f"{inbox}.{rid}")  # fmt: skip
        chunks: dict[str, list[GenerateOutput]] = {rid: [] for rid in ids}
        batch_sizes = []
        async with asyncio.timeout(20):
            while not all(c and c[-1].finish_reason for c in chunks.values()):
                msg = await subscription.next_msg(timeout=20)
                if msg.subject == f"{inbox}.{BATCH_SUFFIX}":
                    batch = TypeAdapter(list[GenerateOutput]).validate_json(msg.data)
                    assert "single" not in {out.request_id for out in batch}
                    batch_sizes.append(len(batch))
                else:
                    batch = [GenerateOutput.model_validate_json(msg.data)]
                    assert msg.subject == f"{inbox}.single" == f"{inbox}.{batch[0].request_id}"
                for out in batch:
                    chunks[out.request_id].append(out)
        assert max(batch_sizes) > 1  # the three batching requests stepped together
        for rid, outs in chunks.items():
            assert sum(len(out.token_ids) for out in outs) == 6, rid
            assert [out.finish_reason for out in outs][-1] == "length"
            assert all(out.finish_reason is None for out in outs[:-1])
    finally:
        await nc.close()
        await worker.stop()


def test_outbox_chunks_coalesce_and_encode_as_their_outputs() -> None:
    """The outbox joins a request's consecutive chunks (not past a finish, nor across
    logprobs on one side only) and writes each chunk byte for byte as `output_json` writes
    its `GenerateOutput`."""
    import orjson

    from contract.messages import TokenLogprob, output_json
    from mpi_workers.engine.streaming import Chunk, coalesce_chunks
    from mpi_workers.worker import _wire

    lp = [TokenLogprob(token_id=9, logprob=-0.5)]
    chunks = [
        Chunk("a", [1], None, None, 20, 16, None),
        Chunk("b", [5], None, None, 30, 0, None),
        Chunk("a", [2, 3], None, None, 20, 16, None),
        Chunk("b", [6], None, "length", 30, 0, None),
        Chunk("b", [7], None, None, 30, 0, None),  # after a finish: kept apart
        Chunk("c", [9], lp, None, 4, 0, None),
        Chunk("c", [8], None, "error", 4, 0, "engine error: x"),  # logprobs on one side
    ]
    joined = coalesce_chunks(chunks)
    assert [(c.request_id, c.token_ids, c.finish_reason) for c in joined] == [
        ("a", [1, 2, 3], None), ("b", [5, 6], "length"), ("b", [7], None),
        ("c", [9], None), ("c", [8], "error"),
    ]  # fmt: skip
    assert joined[0].num_cached_tokens == 16 and joined[1].num_prompt_tokens == 30
    for chunk in joined:
        assert orjson.dumps(_wire(chunk)) == output_json(chunk.output())
    batch = orjson.dumps([_wire(c) for c in joined])
    assert batch == b"[" + b",".join(output_json(c.output()) for c in joined) + b"]"


async def test_load_change_wakes_the_metrics_task_only_when_no_step_will_report_it() -> None:
    """While requests are in flight and replies went out lately, the replies' publisher
    sends the load report with a step's replies: a start or end does not wake the metrics
    task. With no request left, or no replies lately, it does (the report must not wait
    for the 0.5 s interval)."""
    from mpi_workers.worker import METRICS_POLL_S

    worker = Worker(FakeEngine(), deployment="d", worker_id="agg-g0-i0", role="agg",
                    nats_url="nats://unused", etcd_endpoint="unused", lease_ttl_s=5,
                    capacity=4)  # fmt: skip
    loop = asyncio.get_running_loop()
    worker._loop = loop
    busy = loop.create_future()
    worker._inflight = {"r1": busy, "r2": busy}  # type: ignore[dict-item]

    def change(outbox_age_s: float, done: str | None = None) -> bool:
        worker._outbox_at = loop.time() - outbox_age_s
        waiter = worker._metrics_waiter = loop.create_future()
        if done is None:
            worker._note_load_change()
        else:
            worker._request_done(done)
        return waiter.done()

    assert not change(0.001)  # stepping: the next step's replies carry the report
    assert worker._metrics_changed
    assert change(METRICS_POLL_S * 2)  # no replies lately: the task reports
    assert not change(0.001, done="r1")  # r2 still runs
    assert change(0.001, done="r2")  # the last one ended: no step will report it
    busy.cancel()


async def test_an_engine_that_cannot_embed_refuses_pooling_by_name(
    started_worker: Worker, nats_url: str
) -> None:
    assert started_worker.card.tasks == ["generate"]
    nc = await bus.connect(nats_url, "test")
    try:
        request = GenerateRequest(request_id="emb", token_ids=[5, 6], pooling=PoolingParams())
        chunks = await stream(nc, started_worker.subject, request)
    finally:
        await nc.close()
    assert len(chunks) == 1 and chunks[0].finish_reason == "error"
    assert chunks[0].error_param == "pooling" and "makes no embeddings" in (chunks[0].error or "")


def test_card_lists_embed_for_agg_workers_only() -> None:
    from mpi_workers.engine.mocker import MockerEngine

    def card_of(role: str) -> WorkerCard:
        return Worker(MockerEngine(), deployment="d", worker_id="w", role=role,
                      nats_url="nats://unused:1", etcd_endpoint="http://unused:1",
                      lease_ttl_s=5, capacity=1).card  # fmt: skip

    assert card_of("agg").tasks == ["embed", "generate"]
    assert card_of("prefill").tasks == ["generate"] == card_of("decode").tasks
