"""Messages survive the JSON round trip and reject what they do not know."""

from __future__ import annotations

import random

import orjson
import pytest
from pydantic import TypeAdapter, ValidationError

from contract.discovery import WorkerCard
from contract.messages import (
    PROTOCOL_VERSION,
    SAMPLING_BOUNDS,
    AbortRequest,
    GenerateOutput,
    GenerateRequest,
    GuidedDecoding,
    KvBatchOps,
    KvEvent,
    KvEventBatch,
    KvRemoved,
    KvStored,
    LoadMetrics,
    MediaRef,
    SamplingParams,
    ThinkingFirst,
    TokenLogprob,
    TopLogprob,
    choice_seed,
    output_json,
    parse_kv_event_batch,
    request_json,
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
            KvStored(parent_hash=None, block_hashes=[2**63 + 5]),
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
            events.append(KvStored(parent_hash=parent, block_hashes=hashes))
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
                                    "block_hashes": [3], "x": 0}]},
            {**message, "events": [*message["events"],
                                   {"kind": "stored", "parent_hash": "1",
                                    "block_hashes": [False]}]},
            {**message, "events": [*message["events"],  # protocol 1's shape: refused
                                   {"kind": "stored", "parent_hash": None,
                                    "blocks": [{"block_hash": 3, "num_tokens": 16}]}]},
            *({**message, "events": [*message["events"], {"kind": "stored", "parent_hash": None,
                                                          "block_hashes": hashes}]}
              for hashes in (
                  [3, True], [3, 16.0], [3, "4"], [3, [4]], [3, None], {"3": 3}, 3, [],
                  [{"block_hash": 3, "num_tokens": 16}],
              )),
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


def test_kv_batch_json_is_the_schema_and_takes_the_fast_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker writes KV batches by hand (orjson): the same JSON as
    `KvEventBatch.model_dump_json()`, so routers parse it on their fast path."""
    import orjson

    from contract.messages import (
        KvBatchOps,
        KvEventBatch,
        KvRemoved,
        KvStored,
        kv_batch_json,
        parse_kv_event_batch,
    )

    events = [
        KvStored(parent_hash=None, block_hashes=[2**64 - 1]),
        KvStored(parent_hash=2**64 - 1, block_hashes=[7, 8]),
        KvRemoved(block_hashes=[3, 4]),
    ]  # fmt: skip
    data = kv_batch_json("agg-g0-i0", 12, events)
    schema = KvEventBatch(worker_id="agg-g0-i0", seq=12, events=events)
    assert orjson.loads(data) == orjson.loads(schema.model_dump_json())
    assert KvEventBatch.model_validate_json(data) == schema
    expected = KvBatchOps.of(schema)

    def slow_path(*args, **kwargs):
        raise AssertionError("parsed through the schema, not the fast path")

    monkeypatch.setattr(KvEventBatch, "model_validate_json", slow_path)
    assert parse_kv_event_batch(data) == expected


def _random_request(rng: random.Random) -> GenerateRequest:
    sampling = SamplingParams(
        max_tokens=rng.randint(1, 5000),
        temperature=rng.choice([0.0, 1.0, 0.7, 1e-7, rng.uniform(0, 2)]),
        top_p=rng.choice([1.0, rng.uniform(0.01, 1)]),
        top_k=rng.choice([0, -1, rng.randint(1, 100)]),
        min_p=rng.uniform(0, 1),
        repetition_penalty=rng.uniform(0.5, 2),
        presence_penalty=rng.uniform(-2, 2),
        frequency_penalty=rng.uniform(-2, 2),
        seed=rng.choice([None, 0, -(2**63), 2**63 - 1, rng.randint(-1000, 1000)]),
        stop_token_ids=[rng.randint(0, 10**6) for _ in range(rng.randint(0, 3))],
        ignore_eos=rng.random() < 0.5,
        logprobs=rng.choice([None, 0, rng.randint(1, 20)]),
        min_tokens=rng.choice([0, rng.randint(1, 50)]),
        logit_bias={
            rng.randint(0, 10**6): rng.choice([100.0, -100.0, rng.uniform(-100, 100)])
            for _ in range(rng.choice([0, 0, 1, 5]))
        },
        guided=rng.choice([None, None, GuidedDecoding(kind="json_object"), GuidedDecoding(
            kind="json_schema", spec='{"type": "string", "pattern": "\\\\d+é"}',
            generated=rng.randint(0, 9),
        ), GuidedDecoding(kind="regex", spec="a+", thinking=ThinkingFirst(
            close="</think>", open=rng.choice([None, "<think>"]),
            close_token=rng.choice([None, 151668]),
        ))]),
    )  # fmt: skip
    return GenerateRequest(
        request_id=f"{rng.getrandbits(128):032x}",
        token_ids=[rng.randint(0, 200_000) for _ in range(rng.randint(1, 300))],
        sampling=sampling,
        client_id=rng.choice([None, "chatcmpl-x", 'cmpl-\u00e9"quoted"']),
        batch_replies=rng.random() < 0.5,
        choice_index=rng.choice([0, 0, 1, rng.randint(2, 15)]),
    )


def test_request_json_writes_what_pydantic_writes() -> None:
    """The frontend's fast encoding of a request: byte for byte pydantic's (field order,
    floats, big seeds, escapes), for random requests; a changed field is changed in it."""
    rng = random.Random(14)
    for _ in range(300):
        request = _random_request(rng)
        assert request_json(request) == request.model_dump_json().encode()
        assert GenerateRequest.model_validate_json(request_json(request)) == request
    request = _random_request(rng)
    request.batch_replies = not request.batch_replies
    request.sampling.max_tokens = 3
    assert request_json(request) == request.model_dump_json().encode()


def test_request_json_carries_the_output_constraint() -> None:
    guided = GuidedDecoding(kind="regex", spec="[0-9]+", generated=2)
    request = GenerateRequest(request_id="r", token_ids=[1], sampling=SamplingParams(guided=guided))
    assert request_json(request) == request.model_dump_json().encode()
    assert GenerateRequest.model_validate_json(request_json(request)).sampling.guided == guided


def test_logit_bias_and_min_tokens_travel_to_prefill_and_decode_workers() -> None:
    """The fast encoding (frontend -> worker) and the disaggregated messages (pydantic's,
    worker -> worker) carry logit_bias with its token ids as ints again, and min_tokens."""
    from contract.disagg import DecodeHandoff, RemotePrefillRequest

    sampling = SamplingParams(max_tokens=9, min_tokens=4, logit_bias={42: 100.0, 7: -2.5})
    request = GenerateRequest(request_id="r", token_ids=[1, 2, 3], sampling=sampling)
    assert GenerateRequest.model_validate_json(request_json(request)).sampling == sampling
    prefill = RemotePrefillRequest(request=request)
    again = RemotePrefillRequest.model_validate_json(prefill.model_dump_json())
    assert again.request.sampling == sampling
    handoff = DecodeHandoff(request=request, first=GenerateOutput(request_id="r", token_ids=[5]),
                            reply="inbox", prefill_worker_id="p")  # fmt: skip
    assert DecodeHandoff.model_validate_json(handoff.model_dump_json()).request.sampling == sampling


def test_choice_seed_is_seed_plus_index_within_64_signed_bits() -> None:
    assert [choice_seed(100, i) for i in range(3)] == [100, 101, 102]
    assert choice_seed(-5, 2) == -3
    top = SAMPLING_BOUNDS["seed"].high
    assert choice_seed(top, 0) == top
    assert choice_seed(top, 1) == SAMPLING_BOUNDS["seed"].low  # wraps: still a valid seed
    assert len({choice_seed(top - 1, i) for i in range(4)}) == 4
    assert all(SAMPLING_BOUNDS["seed"].admits(choice_seed(top, i)) for i in range(16))


def test_request_json_with_media_goes_through_pydantic() -> None:
    request = GenerateRequest(
        request_id="r", token_ids=[1, 9, 9, 2],
        media=[MediaRef(kind="image", offset=1, length=2, content_hash=5, subject="m",
                        media_id="i", nbytes=10, width=4, height=4)],
    )  # fmt: skip
    assert request_json(request) == request.model_dump_json().encode()
