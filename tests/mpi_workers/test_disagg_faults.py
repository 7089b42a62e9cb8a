"""Disaggregated workers under faults, in one process with real etcd, NATS and engines.

A "crash" of a prefill worker mid-transfer is simulated faithfully enough for the decode
worker: its card leaves etcd (as when its lease lapses) and its KV push never completes.
Every test checks that no KV block is left allocated on any worker afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from contract import bus
from contract.config import DisaggregationConfig
from contract.discovery import WorkerCard, WorkerDirectory
from contract.messages import GenerateOutput, GenerateRequest, SamplingParams
from frontend.errors import OpenAIError
from frontend.router import LoadTracker
from frontend.state import FrontendState
from frontend.worker_client import WorkerClient, WorkerLost
from mpi_workers.disagg.worker import DisaggWorker

pytestmark = pytest.mark.integration

PROMPT = list(range(100, 140))  # 40 tokens: 3 blocks of 16
_ids = itertools.count()


@pytest.fixture(scope="module")
def engines(model_dir: Path):
    """Three engines (prefill a, prefill b, decode), reused by every test's workers."""
    from mpi_workers.engine.torch.engine import TorchEngine

    return {
        name: TorchEngine(model_dir, block_size=16, num_blocks=64, max_num_seqs=8)
        for name in ("prefill-a", "prefill-b", "decode")
    }


@contextlib.asynccontextmanager
async def deployment(
    engines, etcd_endpoint: str, nats_url: str, roles: list[str], **disagg
) -> AsyncIterator[dict[str, DisaggWorker]]:
    name = f"faults{next(_ids)}"
    settings = DisaggregationConfig(
        **{"strategy": "decode_first", "kv_transfer": "tcp", "transfer_timeout_s": 20, **disagg}
    )
    workers = {
        worker_id: DisaggWorker(
            engines[worker_id], disaggregation=settings, deployment=name, worker_id=worker_id,
            role=worker_id.split("-")[0], nats_url=nats_url, etcd_endpoint=etcd_endpoint,
            lease_ttl_s=2, capacity=8, drain_timeout_s=5,
        )
        for worker_id in roles
    }
    for worker in workers.values():
        await worker.start()
    for worker in workers.values():  # every worker sees every other one
        for _ in range(100):
            if len(worker.directory.workers) == len(workers):
                break
            await asyncio.sleep(0.05)
    try:
        yield workers
    finally:
        for worker in workers.values():
            await worker.stop()
        for worker_id in roles:
            bm = engines[worker_id].block_manager
            assert bm.num_free_blocks == bm.num_blocks, f"{worker_id} leaked KV blocks"


async def send(worker: DisaggWorker, request: GenerateRequest, timeout: float = 60):
    """Publish to a worker's generate subject; collect chunks until one finishes."""
    nc = await bus.connect(worker.nats_url, "test-client")
    inbox = nc.new_inbox()
    chunks: list[GenerateOutput] = []
    done = asyncio.Event()

    async def on_msg(msg) -> None:
        chunk = GenerateOutput.model_validate_json(msg.data)
        chunks.append(chunk)
        if chunk.finish_reason is not None:
            done.set()

    await nc.subscribe(inbox, cb=on_msg)
    await nc.publish(worker.subject, request.model_dump_json().encode(), reply=inbox)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await nc.close()
    return chunks


def request(**sampling) -> GenerateRequest:
    params = {"max_tokens": 8, "temperature": 0.8, "seed": 7, **sampling}
    return GenerateRequest(
        request_id=uuid.uuid4().hex, token_ids=PROMPT, sampling=SamplingParams(**params)
    )


async def reference(engines) -> list[int]:
    """Aggregated serving of the same request (the decode engine alone)."""
    return (await engines["decode"].generate_all(request())).token_ids


def crash_on_push(worker: DisaggWorker) -> None:
    """The worker's card leaves etcd and its KV never arrives: a crash mid-transfer."""

    async def push(*args, **kwargs) -> None:
        assert worker._registration is not None
        await worker._registration.close()
        worker._registration = None
        await asyncio.Event().wait()

    assert worker.transport is not None
    worker.transport.push = push  # type: ignore[method-assign]


def tokens(chunks: list[GenerateOutput]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def test_prefill_crash_mid_transfer_is_retried_on_another_prefill(
    engines, etcd_endpoint: str, nats_url: str
) -> None:
    roles = ["prefill-a", "prefill-b", "decode"]
    async with deployment(engines, etcd_endpoint, nats_url, roles) as workers:
        expected = await reference(engines)
        crash_on_push(workers["prefill-a"])
        workers["decode"]._round_robin = itertools.count()  # prefill-a is picked first
        chunks = await send(workers["decode"], request())
        assert chunks[-1].finish_reason == "length", chunks[-1]
        assert tokens(chunks) == expected  # token-identical to aggregated serving


async def test_every_prefill_failing_ends_the_request_with_a_clear_error(
    engines, etcd_endpoint: str, nats_url: str
) -> None:
    roles = ["prefill-a", "prefill-b", "decode"]
    async with deployment(engines, etcd_endpoint, nats_url, roles) as workers:
        crash_on_push(workers["prefill-a"])
        crash_on_push(workers["prefill-b"])
        chunks = await send(workers["decode"], request())
        assert chunks[-1].finish_reason == "error"
        assert "remote prefill failed on prefill-a, prefill-b" in chunks[-1].error
        assert "left mid-transfer" in chunks[-1].error


async def test_no_prefill_worker_is_a_clear_error_or_a_local_prefill(
    engines, etcd_endpoint: str, nats_url: str
) -> None:
    async with deployment(engines, etcd_endpoint, nats_url, ["decode"]) as workers:
        chunks = await send(workers["decode"], request())
        assert chunks[-1].finish_reason == "error"
        assert "no prefill worker is registered" in chunks[-1].error
    async with deployment(
        engines, etcd_endpoint, nats_url, ["decode"], fallback_local_prefill=True
    ) as workers:
        expected = await reference(engines)
        assert tokens(await send(workers["decode"], request())) == expected


async def test_prefill_first_streams_first_token_then_decode_continues(
    engines, etcd_endpoint: str, nats_url: str
) -> None:
    roles = ["prefill-a", "decode"]
    async with deployment(
        engines, etcd_endpoint, nats_url, roles, strategy="prefill_first"
    ) as workers:
        expected = await reference(engines)
        chunks = await send(workers["prefill-a"], request())
        assert chunks[0].token_ids == expected[:1] and chunks[0].finish_reason is None
        assert tokens(chunks) == expected
        # the prefill worker dies while pushing: the decode worker ends the stream with an error
        crash_on_push(workers["prefill-a"])
        chunks = await send(workers["prefill-a"], request())
        assert chunks[0].token_ids == expected[:1]
        assert chunks[-1].finish_reason == "error"
        assert "KV transfer from prefill failed" in chunks[-1].error


async def test_a_constrained_output_crosses_the_hand_off(
    engines, etcd_endpoint: str, nats_url: str
) -> None:
    """Both strategies: the prefill worker constrains the first token, the decode worker's
    matcher consumes it and goes on; sampled (seeded), the very tokens of aggregated
    serving, a document the schema accepts, ended by the grammar ("stop")."""
    import json

    from contract.messages import GuidedDecoding
    from frontend.tokenization import TextTokenizer

    schema = {"type": "object", "additionalProperties": False, "required": ["k", "n"],
              "properties": {"k": {"enum": ["alpha", "beta"]},
                             "n": {"type": "integer", "minimum": 0, "maximum": 99}}}  # fmt: skip
    guided = GuidedDecoding(kind="json_schema", spec=json.dumps(schema))
    for strategy, entry in (("decode_first", "decode"), ("prefill_first", "prefill-a")):
        async with deployment(
            engines, etcd_endpoint, nats_url, ["prefill-a", "decode"], strategy=strategy
        ) as workers:
            expected = await engines["decode"].generate_all(request(max_tokens=40, guided=guided))
            assert expected.finish_reason == "stop"
            text = TextTokenizer(engines["decode"].model_dir).decode(expected.token_ids)
            value = json.loads(text)
            assert value["k"] in ("alpha", "beta") and 0 <= value["n"] <= 99
            chunks = await send(workers[entry], request(max_tokens=40, guided=guided))
            assert chunks[-1].finish_reason == "stop", chunks[-1]
            assert tokens(chunks) == expected.token_ids


def crash_on_first_decode_chunk(worker: DisaggWorker) -> asyncio.Event:
    """The worker's card leaves etcd and it streams nothing more: a crash mid-decode."""
    crashed = asyncio.Event()

    async def publish(*args, **kwargs) -> None:
        if worker._registration is not None:
            await worker._registration.close()
            worker._registration = None
        crashed.set()
        await asyncio.Event().wait()

    worker._publish = publish  # type: ignore[method-assign]
    return crashed


async def test_prefill_first_decode_worker_dying_fails_the_request_at_the_frontend(
    engines, etcd_endpoint: str, nats_url: str
) -> None:
    """The frontend follows the hand-off: the decode worker leaving ends the request at
    once (WorkerLost) although the prefill worker it was sent to is still alive."""
    roles = ["prefill-a", "decode"]
    async with deployment(
        engines, etcd_endpoint, nats_url, roles, strategy="prefill_first"
    ) as workers:
        prefill = workers["prefill-a"]
        tracker = LoadTracker()
        client = WorkerClient(nats_url, prefill.deployment, tracker)
        directory = WorkerDirectory(etcd_endpoint, prefill.deployment)
        directory.add_listener(client.on_workers_changed)
        await directory.start()
        await client.start("test-frontend")
        crash_on_first_decode_chunk(workers["decode"])
        try:
            stream = await client.open(prefill.card, request(max_tokens=64))
            deadline = asyncio.get_running_loop().time() + 30  # far below request_timeout_s
            first = await stream.next(deadline)
            assert first.token_ids and first.finish_reason is None
            with pytest.raises(WorkerLost) as info:
                while True:
                    output = await stream.next(deadline)
                    assert output.finish_reason is None, output
            # (usually after `crashed`; on a loaded host the 2 s lease may lapse earlier,
            # which is the same departure seen sooner)
            assert info.value.worker_id == "decode"
            assert stream.card.worker_id == "decode"
            stream.close()
            assert client.in_flight == 0 and not tracker.in_flight
        finally:
            await client.stop()
            await directory.stop()


async def test_prefix_reuse_transfers_only_the_missing_blocks(
    engines, etcd_endpoint: str, nats_url: str
) -> None:
    async with deployment(engines, etcd_endpoint, nats_url, ["prefill-a", "decode"]) as workers:
        decode = workers["decode"]
        assert decode.transport is not None
        await engines["decode"].reset_prefix_cache()  # earlier tests cached this prompt
        first = await send(decode, request())
        whole = decode.transport.bytes_received
        again = await send(decode, request())
        assert tokens(again) == tokens(first)
        # 40 prompt tokens = 3 blocks; the 2 full ones are now cached on the decode worker
        assert (decode.transport.bytes_received - whole) * 3 == whole


def test_frontend_answers_503_without_the_other_half() -> None:
    def card(role: str) -> WorkerCard:
        return WorkerCard(
            worker_id=f"{role}-g0-i0", role=role, model="m", block_size=16, subject="s",
            abort_subject="a", capacity=1, max_model_len=64,
        )  # fmt: skip

    def state(workers: list[WorkerCard], fallback: bool = False) -> SimpleNamespace:
        config = SimpleNamespace(
            name="d", disaggregation=DisaggregationConfig(fallback_local_prefill=fallback)
        )
        directory = SimpleNamespace(workers={c.worker_id: c for c in workers})
        return SimpleNamespace(config=config, directory=directory)

    check = FrontendState.check_disaggregated_peer
    with pytest.raises(OpenAIError) as info:
        check(state([card("decode")]), card("decode"))
    assert info.value.status == 503
    assert "no prefill worker is registered" in str(info.value)
    check(state([card("decode")], fallback=True), card("decode"))
    check(state([card("decode"), card("prefill")]), card("decode"))
    check(state([card("agg")]), card("agg"))
    with pytest.raises(OpenAIError, match="no decode worker"):
        check(state([card("prefill")]), card("prefill"))
