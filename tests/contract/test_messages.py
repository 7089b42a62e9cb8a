"""Messages survive the JSON round trip and reject what they do not know."""

from __future__ import annotations

import itertools
import random

import orjson
import pytest
from pydantic import TypeAdapter, ValidationError

from contract.discovery import WorkerCard
from contract.messages import (
    PROTOCOL_VERSION,
    AbortRequest,
    GenerateOutput,
    GenerateRequest,
    KvBatchOps,
    KvEvent,
    KvEventBatch,
    KvRemoved,
    KvStored,
    LoadMetrics,
    SamplingParams,
    StoredBlock,
    TokenLogprob,
    TopLogprob,
    coalesce_outputs,
    output_json,
    parse_kv_event_batch,
)

MESSAGES = [
    GenerateRequest(
        request_id="r", token_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=5, temperature=0.0, seed=7, stop_token_ids=[2]),
    ),
    GenerateOutput(
        request_id="r", token_ids=[4], finish_reason="length", num_prompt_tokens=3,
        logprobs=[
            TokenLogprob(token_id=4, logprob=-0.5, top=[TopLogprob(token_id=4, logprob=-0.5)])
        ],
    ),
    GenerateOutput(request_id="r", finish_reason="error", error="bad", error_param="top_p"),
    AbortRequest(request_id="r"),
    KvEventBatch(
        worker_id="w", seq=3,
        events=[
            KvStored(parent_hash=None, blocks=[StoredBlock(block_hash=2**63 + 5, num_tokens=16)]),
            KvRemoved(block_hashes=[1, 2]),
        ],
    ),
    LoadMetrics(worker_id="w", active_sequences=2, free_blocks=10, total_blocks=12),
    WorkerCard(
        worker_id="w", role="agg", model="m", block_size=16, subject="s", abort_subject="a",
        capacity=4, max_model_len=2048,
    ),
]  # fmt: skip


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message) -> None:
    again = type(message).model_validate_json(message.model_dump_json())
    assert again == message
    assert again.version == PROTOCOL_VERSION


def test_kv_events_are_discriminated() -> None:
    adapter = TypeAdapter(KvEvent)
    assert isinstance(adapter.validate_python({"kind": "removed", "block_hashes": [1]}), KvRemoved)
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "moved", "block_hashes": [1]})


def test_unknown_fields_and_reasons_are_rejected() -> None:
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate_json('{"request_id": "r", "token_ids": [], "extra": 1}')
    with pytest.raises(ValidationError):
        GenerateOutput(request_id="r", finish_reason="tired")


@pytest.mark.parametrize(
    "output",
    [
        GenerateOutput(request_id="r", token_ids=[1, 2]),
        GenerateOutput(request_id="r", token_ids=[3], finish_reason="length",
                       num_prompt_tokens=7, num_cached_tokens=4),
        GenerateOutput(request_id="r", finish_reason="error", error="bad", error_param="top_p"),
        GenerateOutput(request_id="r", worker_id="decode-g1-i0"),
        GenerateOutput(request_id="r", token_ids=[5], logprobs=[TokenLogprob(token_id=5,
                       logprob=-0.5, top=[TopLogprob(token_id=6, logprob=-1.0)])]),
    ],
)  # fmt: skip
def test_output_json_reads_back_as_the_same_output(output: GenerateOutput) -> None:
    assert GenerateOutput.model_validate_json(output_json(output)) == output


def _random_batch(rng: random.Random) -> KvEventBatch:
    events: list[KvStored | KvRemoved] = []
    for _ in range(rng.randrange(0, 6)):
        hashes = [rng.randrange(0, 2**64) for _ in range(rng.randrange(0, 9))]
        if rng.random() < 0.6:
            parent = rng.choice([None, rng.randrange(0, 2**64)])
            blocks = [StoredBlock(block_hash=h, num_tokens=rng.randrange(1, 65)) for h in hashes]
            events.append(KvStored(parent_hash=parent, blocks=blocks))
        else:
            events.append(KvRemoved(block_hashes=hashes))
    return KvEventBatch(worker_id=f"w{rng.randrange(99)}", seq=rng.randrange(1, 10**9),
                        events=events)  # fmt: skip


def _pydantic_ops(data: bytes) -> KvBatchOps | type[ValueError]:
    try:
        return KvBatchOps.of(KvEventBatch.model_validate_json(data))
    except ValueError:
        return ValueError


def _fast_ops(data: bytes) -> KvBatchOps | type[ValueError]:
    try:
        return parse_kv_event_batch(data)
    except ValueError:
        return ValueError


def test_fast_kv_batch_parse_equals_the_pydantic_parse() -> None:
    """The KV index's orjson parse gives exactly what the schema gives, batch by batch,
    on random batches as workers write them and on bent ones (the schema decides those)."""
    rng = random.Random(14)
    for _ in range(300):
        batch = _random_batch(rng)
        data = batch.model_dump_json().encode()
        assert _fast_ops(data) == _pydantic_ops(data) == KvBatchOps.of(batch)
        message = orjson.loads(data)
        bent: list[object] = [
            {**message, "extra": 1},
            {k: v for k, v in message.items() if k != "seq"},
            {**message, "seq": str(message["seq"])},  # lax: pydantic takes "12" as 12
            {**message, "seq": True},
            {**message, "worker_id": 5},
            {**message, "events": {"kind": "stored"}},
            {**message, "events": [*message["events"], {"kind": "moved", "block_hashes": []}]},
            {**message, "events": [*message["events"], {"kind": "removed", "block_hashes": [1.0]}]},
            {**message, "events": [*message["events"], {"kind": "removed", "block_hashes": ["7"]}]},
            {**message, "events": [*message["events"],
                                   {"kind": "stored", "parent_hash": None,
                                    "blocks": [{"block_hash": 3, "num_tokens": 16, "x": 0}]}]},
            {**message, "events": [*message["events"],
                                   {"kind": "stored", "parent_hash": "1",
                                    "blocks": [{"block_hash": False, "num_tokens": 16}]}]},
            [message],
        ]  # fmt: skip
        for shape in bent:
            data = orjson.dumps(shape)
            assert _fast_ops(data) == _pydantic_ops(data), shape
    assert _fast_ops(b"{not json") is ValueError
    huge = (
        b'{"version": 1, "worker_id": "w", "seq": 1, "events": [{"kind": "removed", '
        b'"block_hashes": [' + str(2**70).encode() + b"]}]}"
    )  # past orjson's ints
    assert _fast_ops(huge) == _pydantic_ops(huge)
    assert _fast_ops(huge) is not ValueError


def _random_outputs(rng: random.Random) -> list[GenerateOutput]:
    """Chunks of three interleaved requests as a worker's outbox holds them."""
    outputs: list[GenerateOutput] = []
    finished: set[str] = set()
    for _ in range(rng.randrange(0, 15)):
        request_id = rng.choice("abc")
        if request_id in finished:
            continue
        with_logprobs = request_id == "c"
        tokens = [rng.randrange(1000) for _ in range(rng.randrange(0, 3))]
        roll = rng.random()
        output = GenerateOutput(
            request_id=request_id,
            token_ids=tokens,
            logprobs=[TokenLogprob(token_id=t, logprob=-1.0) for t in tokens]
            if with_logprobs else None,
            num_prompt_tokens=rng.choice([0, 7]),
            num_cached_tokens=rng.choice([0, 3]),
            finish_reason="length" if roll < 0.15 else None,
            worker_id="d1" if 0.15 <= roll < 0.25 else None,
        )  # fmt: skip
        if output.finish_reason is not None:
            finished.add(request_id)
        outputs.append(output)
    return outputs


def test_coalesced_outputs_carry_the_same_stream_per_request() -> None:
    """Joining a request's consecutive chunks keeps its tokens, logprobs, hand-off
    announcements and finish in order; counts come from the last chunk that had them."""
    rng = random.Random(7)
    joined_some = False
    for _ in range(400):
        outputs = _random_outputs(rng)
        before = [o.model_copy(deep=True) for o in outputs]
        coalesced = coalesce_outputs(outputs)
        assert outputs == before  # inputs untouched
        joined_some |= len(coalesced) < len(outputs)
        for request_id in "abc":
            mine = [o for o in outputs if o.request_id == request_id]
            theirs = [o for o in coalesced if o.request_id == request_id]
            tokens = [t for o in mine for t in o.token_ids]
            assert [t for o in theirs for t in o.token_ids] == tokens
            assert [e for o in theirs for e in o.logprobs or []] == [
                e for o in mine for e in o.logprobs or []
            ]
            assert [o.worker_id for o in theirs if o.worker_id] == [
                o.worker_id for o in mine if o.worker_id
            ]
            assert [o.finish_reason for o in theirs if o.finish_reason] == [
                o.finish_reason for o in mine if o.finish_reason
            ]
            if mine:
                assert theirs[-1].finish_reason == mine[-1].finish_reason
                assert max(o.num_prompt_tokens for o in theirs) == max(
                    o.num_prompt_tokens for o in mine
                )
            for prev, nxt in itertools.pairwise(theirs):  # only a hand-off splits
                assert prev.worker_id is not None or nxt.worker_id is not None
    assert joined_some
