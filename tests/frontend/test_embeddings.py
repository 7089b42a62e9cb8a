"""`/v1/embeddings` without services: the request schema's forms and refusals (each naming
its field), the wire form of a vector (base64 float32) and its JSON floats, which read back
to the very float32 values; the refusal of a deployment whose engines cannot embed."""

from __future__ import annotations

import base64
import math
import struct

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from contract.discovery import WorkerCard
from contract.messages import (
    GenerateOutput,
    GenerateRequest,
    PoolingParams,
    decode_embedding,
    encode_embedding,
    output_json,
    request_json,
)
from frontend.embeddings import _encoded
from frontend.errors import OpenAIError, from_validation_errors
from frontend.openai_schemas import EmbeddingRequest
from frontend.state import embedding_workers

TRICKY = [1 / 3, -0.0, 1e-40, 3.4028234e38, -2.5e-8, 0.1, 1.0, -123.456]


@pytest.mark.parametrize(
    ("value", "inputs", "params"),
    [
        ("hello", ["hello"], ["input"]),
        ([5, 6, 7], [[5, 6, 7]], ["input"]),
        (["a", "b"], ["a", "b"], ["input.0", "input.1"]),
        ([[1], [2, 3]], [[1], [2, 3]], ["input.0", "input.1"]),
    ],
)
def test_input_forms(value, inputs, params) -> None:
    body = EmbeddingRequest.model_validate({"input": value})
    assert body.inputs() == inputs
    assert [body.input_param(i) for i in range(len(inputs))] == params
    assert body.encoding_format == "float" and body.dimensions is None


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": ""}, "input", "empty"),
        ({"input": []}, "input", "at least one"),
        ({"input": ["a", ""]}, "input", "item 1"),
        ({"input": [[1], []]}, "input", "item 1"),
        ({}, "input", "required"),
        ({"input": "a", "encoding_format": "hex"}, "encoding_format", ""),
        ({"input": "a", "dimensions": 0}, "dimensions", ""),
        ({"input": "a", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens", ""),
        ({"input": "a", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "-1"),
    ],
)
def test_refusals_name_the_field(body, param, words) -> None:
    with pytest.raises(ValidationError) as caught:
        EmbeddingRequest.model_validate(body)
    error = from_validation_errors(caught.value.errors())  # type: ignore[arg-type]
    assert error.status == 400 and error.param == param
    assert words in error.message


def test_mixed_or_float_items_are_refused_under_input() -> None:
    for value in ([3.5], ["a", [1]], [[1], "a"], {"text": "a"}):
        with pytest.raises(ValidationError) as caught:
            EmbeddingRequest.model_validate({"input": value})
        error = from_validation_errors(caught.value.errors())  # type: ignore[arg-type]
        assert error.param is not None and error.param.startswith("input"), value


def test_wire_vector_round_trips_and_is_little_endian_float32() -> None:
    values = np.array(TRICKY, dtype="<f4")
    text = encode_embedding(values.tobytes())
    assert text == base64.b64encode(struct.pack("<8f", *TRICKY)).decode()
    back = decode_embedding(text)
    assert np.array_equal(np.array(back, dtype=np.float32), values)
    assert math.copysign(1.0, back[1]) == -1.0


@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_response_vector_reads_back_to_the_same_float32(fmt: str) -> None:
    values = np.random.default_rng(7).standard_normal(4096).astype("<f4")
    values[:8] = TRICKY
    output = GenerateOutput(request_id="r", finish_reason="stop",
                            embedding=encode_embedding(values.tobytes()))  # fmt: skip
    body = EmbeddingRequest.model_validate({"input": "x", "encoding_format": fmt})
    encoded = orjson.loads(orjson.dumps({"embedding": _encoded(output, body)}))["embedding"]
    if fmt == "base64":
        assert encoded == output.embedding
        return
    assert np.array_equal(np.array(encoded, dtype=np.float32), values)
    text = orjson.dumps(_encoded(output, body))
    assert len(text) < 12 * len(values)  # float32's shortest texts, not a double's 17 digits


def test_pooling_crosses_the_wire() -> None:
    request = GenerateRequest(request_id="r", token_ids=[1, 2],
                              pooling=PoolingParams(pooling_type="MEAN", dimensions=8))  # fmt: skip
    assert GenerateRequest.model_validate_json(request_json(request)) == request
    output = GenerateOutput(request_id="r", finish_reason="stop", embedding="AACAPw==")
    assert GenerateOutput.model_validate_json(output_json(output)) == output
    assert decode_embedding("AACAPw==") == [1.0]


def card(worker_id: str, tasks: list[str]) -> WorkerCard:
    return WorkerCard(worker_id=worker_id, role="agg", model="m", block_size=16, subject="s",
                      abort_subject="a", capacity=1, max_model_len=64, engine="trtllm",
                      tasks=tasks)  # fmt: skip


def test_embedding_workers_keep_the_able_or_refuse_naming_model() -> None:
    able = card("b", ["embed", "generate"])
    assert embedding_workers([card("a", ["generate"]), able]) == [able]
    with pytest.raises(OpenAIError) as refused:
        embedding_workers([card("a", ["generate"])])
    assert refused.value.status == 400 and refused.value.param == "model"
    assert "trtllm engine" in refused.value.message
