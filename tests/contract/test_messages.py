"""Messages survive the JSON round trip and reject what they do not know."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from contract.discovery import WorkerCard
from contract.messages import (
    PROTOCOL_VERSION,
    AbortRequest,
    GenerateOutput,
    GenerateRequest,
    KvEvent,
    KvEventBatch,
    KvRemoved,
    KvStored,
    LoadMetrics,
    SamplingParams,
    StoredBlock,
    TokenLogprob,
    TopLogprob,
    output_json,
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
